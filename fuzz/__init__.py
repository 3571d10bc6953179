"""Coverage-guided fuzzing harnesses (atheris), one module per target (see fuzz/README.md).

Each harness module exposes ``test_one_input(data: bytes) -> None``, which raises
``AssertionError`` (or lets an undocumented exception escape) when the code under test
breaks its contract, and ``main()``, which runs it under atheris:
``python -m fuzz.<target> [libFuzzer flags] [corpus dirs]``.
"""
