//! FUSE data path for slacker volumes (in progress).
