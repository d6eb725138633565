"""mailhub's tests: unit tests with fakes, integration tests with real servers."""
