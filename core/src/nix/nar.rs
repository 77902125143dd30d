//! TODO(formats helper)
