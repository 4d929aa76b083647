import sys
def test_path() -> None:
    print([p for p in sys.path if "work/main" in p])
    import example_app  # noqa: F401
