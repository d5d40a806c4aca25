"""LoRA file formats: diffusers/peft, kohya, LyCORIS; safetensors I/O, hashes, family detection."""

from composer.formats.family import detect_family, family_from_string
from composer.formats.model import FAMILIES, FileHashes, LoraFile, ModuleDelta
from composer.formats.readers import convert_state_dict, read_lora
from composer.formats.safetensors_io import file_hashes, load_tensors, read_header, refuse_pickle, save
from composer.formats.triggers import read_sidecars, trigger_words
from composer.formats.writers import write_diffusers, write_kohya

__all__ = [
    "FAMILIES",
    "FileHashes",
    "LoraFile",
    "ModuleDelta",
    "convert_state_dict",
    "detect_family",
    "family_from_string",
    "file_hashes",
    "load_tensors",
    "read_header",
    "read_lora",
    "read_sidecars",
    "refuse_pickle",
    "save",
    "trigger_words",
    "write_diffusers",
    "write_kohya",
]
