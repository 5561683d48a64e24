"""`nbs/evaluate.ipynb -p export DIR` writes a timm-loadable export normalized with the evaluation data's statistics."""
import json
from pathlib import Path

import pytest

import papermill as pm
import timm
import torch
from safetensors.torch import load_file

from magma.datasets import get_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow(reason="about 50 s (papermill runs nbs/evaluate.ipynb); export_timm itself: 13_export's cells")
def test_evaluate_notebook_exports_for_timm(tmp_path):
    exp = tmp_path / 'export'
    pm.execute_notebook(str(ROOT / 'nbs' / 'evaluate.ipynb'), str(tmp_path / 'out.ipynb'), parameters=dict(task='knn', export=str(exp)),
                        cwd=str(ROOT / 'nbs'), progress_bar=False)
    cfg = json.loads((exp / 'config.json').read_text())
    pc = cfg.get('pretrained_cfg', cfg)
    ds = get_dataset('synthetic', 'train_labeled', n_per_class=4)     # the notebook's self-contained smoke data
    torch.testing.assert_close(torch.tensor(pc['mean']), torch.tensor(ds.mean), rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(pc['std']), torch.tensor(ds.std), rtol=0, atol=1e-4)
    sd = load_file(str(exp / 'model.safetensors'))
    assert 'cls_token' in sd and 'blocks.0.attn.qkv.weight' in sd                  # timm's own state-dict names
    model = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0, img_size=32, patch_size=4, num_heads=12)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if not k.startswith('head')]
