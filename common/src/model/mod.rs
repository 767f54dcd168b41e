//! One file per model architecture family.
