"Package-level checks of magma.evaluate / magma.export with the other modules: SSL methods, checkpoints on disk."
import hashlib, json
import pytest, torch
from safetensors.torch import save_file
from magma.backbone import create_backbone
from magma.evaluate import evaluate, load_encoder, extract_features, linear_probe, finetune, feature_cache_path
from magma.export import export_timm, load_timm


def _images(n, C=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    return (0.7 * torch.eye(3)[y][:, :, None, None] + 0.1 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1), y


def _sha(p): return hashlib.sha256(p.read_bytes()).hexdigest()


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
    r = linear_probe(e2, tr, te, mode='paper', epochs=2, batch_size=32)
    finetune(e2, tr, te, epochs=1, batch_size=32)
    r = evaluate(e2, tr, te, epochs=5, batch_size=32)
    assert {'knn_acc', 'linear_acc', 'dbi'} <= set(r)
    assert _sha(ck) == h                                          # evaluation never writes the checkpoint
    torch.testing.assert_close(extract_features(e2, te)[0], extract_features(enc, te)[0])


def test_checkpoint_via_loader_and_cache(tmp_path):
    enc = create_backbone('vit_tiny', img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4)
    ck = tmp_path / 'checkpoint.safetensors'; ck.write_bytes(b'stub')
    class M(torch.nn.Module):
        def __init__(self): super().__init__(); self.encoder = enc
    assert load_encoder(ck, loader=lambda p: (M(), {})) is enc    # the loader stands in for magma.train.load_pretrained
    c = feature_cache_path(tmp_path, 'test')                      # a run dir resolves to its checkpoint file
    assert c == feature_cache_path(ck, 'test') and c.parent == tmp_path / 'features'


def test_export_of_a_method_encoder_loads_in_timm(tmp_path):
    methods = pytest.importorskip("magma.methods")
    enc = methods.create('mae', img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4).encoder.eval()
    export_timm(enc, tmp_path / 'exp')
    m = load_timm(tmp_path / 'exp')
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x), enc.encode(x)[0][:, 0])
    assert json.loads((tmp_path / 'exp' / 'config.json').read_text())['model_args']['depth'] == 2
