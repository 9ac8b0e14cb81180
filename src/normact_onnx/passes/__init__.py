"""Graph passes: find sites, emit normalized forms, move affine maps into neighbours."""
