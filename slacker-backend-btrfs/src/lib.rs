//! btrfs backend for slacker (in progress).
