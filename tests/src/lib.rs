//! End-to-end tests of kvserve; the tests live in `tests/tests/`.
