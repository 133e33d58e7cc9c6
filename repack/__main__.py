from repack.cli.app import main

main()
