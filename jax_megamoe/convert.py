"""Convert DeepSeek V4 MoE layers into kernel layout ahead of time: ``python -m jax_megamoe.convert``."""

from jax_megamoe._src.io.convert import (
    FORMAT,
    FORMAT_VERSION,
    TARGETS,
    check_converted,
    is_converted_dir,
    layer_file_names,
    load_converted,
    main,
    parse_layers,
    validate_manifest,
    write_converted_layer,
    write_safetensors,
)

__all__ = [
    "main",
    "load_converted",
    "write_converted_layer",
    "write_safetensors",
    "layer_file_names",
    "check_converted",
    "validate_manifest",
    "is_converted_dir",
    "parse_layers",
    "FORMAT",
    "FORMAT_VERSION",
    "TARGETS",
]

if __name__ == "__main__":
    raise SystemExit(main())
