"""LoRA file formats: diffusers/peft, kohya, LyCORIS; safetensors I/O, hashes, family detection."""
