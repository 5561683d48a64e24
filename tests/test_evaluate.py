"Package-level checks of magma.evaluate / magma.export with the other modules: SSL methods, magma datasets, checkpoints on disk."
import hashlib, json
import pytest, torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from safetensors.torch import save_file
from magma.backbone import create_backbone
from magma.datasets import get_dataset, holdout_split
from magma.evaluate import evaluate, load_encoder, extract_features, linear_probe, finetune, feature_cache_path


def _images(n, C=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    return (0.7 * torch.eye(3)[y][:, :, None, None] + 0.1 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1), y


def _sha(p): return hashlib.sha256(p.read_bytes()).hexdigest()


def _vit(seed=0, img_size=16):
    torch.manual_seed(seed)
    return create_backbone('vit_tiny', img_size=img_size, patch_size=4, embed_dim=32, depth=2, num_heads=4).eval()


def _direct(enc, ds, size):
    "CLS and mean-pool features of a magma dataset by hand: bytes to [0, 1], bicubic antialiased resize, normalize, encode."
    x = F.interpolate(ds.images.float() / 255, size=size, mode='bicubic', antialias=True, align_corners=False).clamp(0, 1)
    x = (x - torch.tensor(ds.mean).view(1, 3, 1, 1)) / torch.tensor(ds.std).view(1, 3, 1, 1)
    with torch.no_grad(): t = enc.encode(x)[0]
    return {'cls': t[:, 0], 'mean': t[:, 1:].mean(1)}


def _knn_top1(bank, bank_y, q, q_y, k=10):
    "Plain float64 weighted kNN (solo-learn's): the k nearest by Euclidean distance vote 1 / (d + 1e-5)."
    d = torch.cdist(q.double(), bank.double())
    dist, idx = d.topk(k, dim=1, largest=False)
    votes = torch.zeros(len(q), int(bank_y.max()) + 1, dtype=torch.float64).scatter_add_(1, bank_y[idx], 1 / (dist + 1e-5))
    return 100 * (votes.argmax(1) == q_y).double().mean().item()


def test_method_encoder_and_checkpoint_untouched(tmp_path):
    methods = pytest.importorskip("magma.methods")
    model = methods.create('m-mae', img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4)
    enc = load_encoder(model)
    assert enc is model.encoder
    ck = tmp_path / 'run' / 'checkpoint.safetensors'; ck.parent.mkdir()
    save_file({f'encoder.{k}': v.contiguous() for k, v in enc.state_dict().items()}, str(ck))
    h = _sha(ck)
    e2 = load_encoder(ck, like=enc)
    tr, te = _images(60), _images(30, seed=1)
    linear_probe(e2, tr, te, mode='paper', epochs=2, batch_size=32)
    finetune(e2, tr, te, epochs=1, batch_size=32)
    r, _ = evaluate(e2, tr, te, epochs=5, batch_size=32, cache_dir=tmp_path / 'features', checkpoint=ck)
    assert {'knn_acc', 'linear_acc', 'dbi', 'knn_acc_mean'} <= set(r)
    assert _sha(ck) == h                                          # evaluation never writes the checkpoint
    torch.testing.assert_close(extract_features(e2, te)['cls'][0], extract_features(enc, te)['cls'][0])


def test_checkpoint_via_loader_and_cache(tmp_path):
    enc = _vit()
    ck = tmp_path / 'checkpoint.safetensors'; ck.write_bytes(b'stub')
    class M(torch.nn.Module):
        def __init__(self): super().__init__(); self.encoder = enc
    assert load_encoder(ck, loader=lambda p: (M(), {})) is enc    # the loader stands in for magma.train.load_pretrained
    c = feature_cache_path(tmp_path, 'test')                      # a run dir resolves to its checkpoint file
    assert c == feature_cache_path(ck, 'test') and c.parent == tmp_path / 'features'


def test_magma_dataset_resized_through_the_eval_loader():
    "A 32 px magma dataset on a 16 px encoder: resized and normalized with its own statistics, as written out by hand."
    ds = get_dataset('synthetic', 'test', n_per_class=4)
    assert ds.img_size == 32
    enc = _vit()
    got, want = extract_features(enc, ds, batch_size=16), _direct(enc, ds, 16)
    for pool in ('cls', 'mean'):
        torch.testing.assert_close(got[pool][0], want[pool], atol=1e-4, rtol=1e-4)
        assert torch.equal(got[pool][1], ds.labels)
    via_dl = extract_features(enc, DataLoader(ds, batch_size=16))   # a DataLoader over it: the same transform
    torch.testing.assert_close(via_dl['cls'][0], got['cls'][0], atol=1e-5, rtol=1e-5)


def test_evaluate_on_magma_datasets_against_float64_knn():
    "evaluate's results.json numbers on real splits (bank, val, test) against a plain float64 kNN on hand-made features."
    bank, val = holdout_split(get_dataset('synthetic', 'train', n_per_class=12), 0.25)
    test = get_dataset('synthetic', 'test', n_per_class=12)
    enc = _vit(1, img_size=32)
    r, feats = evaluate(enc, bank, test, val=val, epochs=3, prefix='random_')
    keys = {f'{q}random_{m}{s}' for q in ('', 'val_') for m in ('knn_acc', 'linear_acc', 'linear_top5', 'dbi') for s in ('', '_mean')}
    assert set(r) == keys
    direct = {n: _direct(enc, d, 32) for n, d in (('bank', bank), ('val', val), ('test', test))}
    for pool, sfx in (('cls', ''), ('mean', '_mean')):
        for q, n in (('', 'test'), ('val_', 'val')):
            torch.testing.assert_close(feats[n][pool][0], direct[n][pool], atol=1e-4, rtol=1e-4)
            want = _knn_top1(direct['bank'][pool], bank.labels, direct[n][pool], feats[n][pool][1])
            assert r[f'{q}random_knn_acc{sfx}'] == pytest.approx(want, abs=1e-9), (q, pool)


def test_export_of_a_method_encoder_loads_in_timm(tmp_path):
    from magma.export import export_timm, load_timm             # imports magma.train: the evaluation tests above do not need it
    methods = pytest.importorskip("magma.methods")
    enc = methods.create('mae', img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4).encoder.eval()
    export_timm(enc, tmp_path / 'exp')
    m = load_timm(tmp_path / 'exp')
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x), enc.encode(x)[0][:, 0])
    assert json.loads((tmp_path / 'exp' / 'config.json').read_text())['model_args']['depth'] == 2
