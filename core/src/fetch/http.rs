//! TODO(substituter helper): reqwest + file:// implementation of Fetch, netrc, retries
