//! NFSv4.1/4.2 client subset.
