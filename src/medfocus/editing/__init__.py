"""Counterfactual editors: ``radedit`` (the paper's diffusion editor, optional extra), ``inpaint``
(OpenCV, out-of-distribution), ``transplant`` (healthy tissue from a normal reference X-ray) and
``oracle`` (exact synthetic counterfactuals). See :mod:`medfocus.editing.base` for the contract."""

from medfocus.editing.base import (
    EDIT_KINDS,
    NORMAL_PROMPT,
    EditCache,
    Editor,
    boxes_mask,
    edit_mask,
    edit_prompt,
    feather_alpha,
    get_editor,
    list_editors,
    register_editor,
    removal_prompt,
)

__all__ = [
    "EDIT_KINDS",
    "NORMAL_PROMPT",
    "EditCache",
    "Editor",
    "boxes_mask",
    "edit_mask",
    "edit_prompt",
    "feather_alpha",
    "get_editor",
    "list_editors",
    "register_editor",
    "removal_prompt",
]
