//! TODO(formats helper): safe NAR unpacking into a directory
