"""Loading the released encoder weights Eagle starts from into eagle_fast's vision experts.

    from eagle_fast.vision.weights import read_native, convert
    native = read_native("sam-1024", "/ckpt/sam-vit-large")       # the release, as stored
    conv = convert("sam-1024", native, expert)                    # expert may be on the meta device
    expert.load_state_dict(conv.state, strict=False)              # after materializing conv.new keys
    print(conv.summary())   # e.g. "sam-1024: 339 loaded, 3 new, 0 mismatched, 143 unused"

Reading (`read_native`): a model directory (HF `model.safetensors`, `pytorch_model.bin` or a sharded
`*.index.json`; timm repos alike; open_clip's `open_clip_model.safetensors` /
`open_clip_pytorch_model.bin`) or one file (`.safetensors`, `*.index.json`, or a pickle `.bin`, `.pth`,
`.pt`, `.ckpt` read with torch.load(weights_only=True), memory-mapped when the file allows). Training
checkpoints are unwrapped by the first nested state present: `ema_state` (EVA's detectron2 runs keep
their EMA weights there; Eagle's EVA loader takes it first), `module` (DeepSpeed; Eagle's second
choice), `model` (detectron2's Checkpointer: Eagle would miss it and load nothing), `state_dict`; else
the top level, as in Eagle. Any failure -> ExpertWeightsError naming the expert and the path.

Formats (`convert` recognises the layout by its keys; one module per format family):
  clip-448         hf-clip: CLIPModel / transformers-4 CLIPVisionModel `vision_model.*`;
                   hf-clip-vision: transformers-5 CLIPVisionModel (flat keys)          (clip.py)
  convnext-1024    timm-convnext (`gamma` -> `weight`), open-clip-convnext (`visual.trunk.*`) (convnext.py)
  sam-1024         hf-sam: SamModel `vision_encoder.*`, its neck never loaded           (sam.py)
  det-1024         detectron2-vitdet: EVA-02 ViTDet `backbone.net.*`, RoPE tables dropped (eva.py)
  pix2struct-1024  hf-pix2struct: Pix2StructForConditionalGeneration `encoder.*`       (pix2struct.py)

Rules (`convert`): keys are only renamed, tensors neither copied nor cast (the caller casts). Every
expert tensor must be filled with its own shape, except SAM's neck (Eagle's replacement, never taken
from the checkpoint even though `neck.conv1` / `neck.layer_norm1` match the pretrained neck's names and
shapes: always `new`) and ConvNeXt's classifier head (never run: may be `new` or `mismatched`). Anything
else missing or of another shape, and checkpoint tensors that fall inside the expert's network but have
no place in it (a checkpoint deeper or wider than the expert config), -> ExpertWeightsError naming the
expert and the keys. Text towers, projections, decoders, detector heads and recomputed buffers (RoPE
tables, position ids) are `unused`.
"""

from eagle_fast.vision.weights.base import ExpertWeightsError
from eagle_fast.vision.weights.convert import Conversion, convert
from eagle_fast.vision.weights.files import read_native

__all__ = ["Conversion", "ExpertWeightsError", "convert", "read_native"]
