"""The ``w3repack`` command line: ``app`` (the typer app, ``main``), ``_errors`` (exceptions to exit codes),
``_output`` (everything printed), and one module per command group, each a thin layer over the library.

A new command goes into the module of its group (or a new module registered in ``app.py``); what it prints goes
into ``_output``; a new kind of failure into ``_errors``.
"""
