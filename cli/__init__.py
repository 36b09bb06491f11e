"""The ``deepcovid`` command line: thin commands over the role packages' domain functions (rq's ``cli/``).

``cli.main`` composes every command; ``cli.render`` is the one place output is formatted.
"""
