"""Teacher backends: token rows -> next-token targets. `vllm` for throughput, `hf` (transformers) for exactness.

Both implement `Teacher` (base.py). Rows are (input_ids [T], loss_mask [T]) pairs; targets are produced for every
t with loss_mask[t] True: the teacher's distribution over token t given tokens < t.
"""

from __future__ import annotations

from .base import (
    SOURCE_RECORD,
    Row,
    Teacher,
    TeacherError,
    TeacherWarning,
    bos_warning,
    check_teacher_path,
    draws_from_topk,
    resolve_dtype,
)

__all__ = ["SOURCE_RECORD", "Row", "Teacher", "TeacherError", "TeacherWarning", "bos_warning", "check_teacher_path",
           "draws_from_topk", "load_teacher", "resolve_dtype"]


def load_teacher(backend: str, path: str, **options) -> Teacher:
    check_teacher_path(path)
    if backend == "vllm":
        from .vllm import VLLMTeacher

        return VLLMTeacher(path, **options)
    if backend == "hf":
        from .hf import HFTeacher

        return HFTeacher.from_pretrained(path, **options)
    raise TeacherError(f"unknown teacher backend {backend!r}: choose 'vllm' or 'hf'")
