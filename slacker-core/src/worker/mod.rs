//! The worker data path: lazy block fetch and a block cache shared by clones (in progress).
