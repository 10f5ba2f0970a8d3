"""The test suite; tests/fakes holds loopback servers in the real services' formats."""
