"""Audio previews: generate some seconds with an exported model, decode them with the table's RAVE."""

from __future__ import annotations

import math
import os
import tempfile
from typing import Optional, Union

import torch


def generate(model: torch.jit.ScriptModule, seconds: float, temperature: float = 1.0, seed: int = 0,
             cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Latents [1, Q, T] generated from a fresh stream (conditioning: zeros unless given [1, C, T])."""
    in_ch, ratio = int(model.forward_params[0]), int(model.forward_params[1])
    frames = max(1, math.ceil(seconds * int(model.sr) / ratio))
    torch.manual_seed(seed)
    model.reset_stream()
    model.set_listen("false")
    if model.set_temperature(float(temperature)) != 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    x = torch.zeros(1, in_ch, frames)
    if cond is not None:
        x[:, int(model.num_quantizers):] = cond[..., :frames]
    with torch.inference_mode():
        out = model(x)
    model.reset_stream()
    return out[:, : int(model.num_quantizers)]


def render_preview(model: Union[str, torch.jit.ScriptModule], rave_path: str, out_wav: str,
                   seconds: float = 8.0, temperature: float = 1.0, seed: int = 0) -> str:
    """Write `out_wav` (atomically): `seconds` of generated latents decoded by RAVE at its rate."""
    import soundfile as sf

    m = torch.jit.load(model, map_location="cpu") if isinstance(model, str) else model
    rave = torch.jit.load(rave_path, map_location="cpu").eval()
    z = generate(m, seconds, temperature, seed)
    with torch.inference_mode():
        audio = rave.decode(z)  # [1, channels, T * ratio]
    audio = audio[0].float().clamp(-1.0, 1.0).T.contiguous().numpy()
    out_wav = os.path.abspath(out_wav)
    os.makedirs(os.path.dirname(out_wav), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".wav", dir=os.path.dirname(out_wav))
    os.close(fd)
    try:
        sf.write(tmp, audio, int(m.sr), subtype="PCM_16")
        os.replace(tmp, out_wav)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_wav
