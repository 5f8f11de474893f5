"""Low-level pieces with no dependency on the rest of the package: segment attention for packed rows,
lean RMSNorm, CPU allocator tuning."""
