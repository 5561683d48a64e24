"""Heavier checks of the data pipeline (magma.datasets, magma.augment, magma.loader): the DataLoader path with worker
processes, end-to-end crop statistics of both paths on the same images, and sharding / resumption over a whole epoch.
Every dataset is generated here, in a temporary directory."""
import numpy as np, pytest, torch
from PIL import Image
from magma.datasets import get_dataset
from magma.augment import ViewAug, sample_crops
from magma.loader import make_loader, pil_crop_boxes
from magma.methods import METHODS

S = 64  # ramp images: red = x coordinate, green = y coordinate

def ramp():
    t = (np.arange(S) + 0.5) / S
    return np.stack([np.broadcast_to(t[None], (S, S)), np.broadcast_to(t[:, None], (S, S)), np.zeros((S, S))], -1)

@pytest.fixture(scope='module')
def ramp_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('ramps')
    img = Image.fromarray((ramp() * 255).round().astype(np.uint8))
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            (root/split/c).mkdir(parents=True)
            for i in range(50): img.save(root/split/c/f'{i}.png')
    return root

def crop_fractions(batches, out):
    "Width and height of each crop as a fraction of the image, and its flip, measured from augmented ramp images."
    w, h = [], []
    for b in batches:
        x = b['img']
        w.append((x[:, 0, :, 3*out//4] - x[:, 0, :, out//4]).mean(1) * 2)
        h.append((x[:, 1, 3*out//4, :] - x[:, 1, out//4, :]).mean(1) * 2)
    return torch.cat(w), torch.cat(h)

def ks(a, b):
    a, b = a.sort().values, b.sort().values; v = torch.cat([a, b])
    return ((torch.searchsorted(a, v, right=True) / len(a)) - (torch.searchsorted(b, v, right=True) / len(b))).abs().max().item()

def test_both_paths_same_crop_distribution(ramp_folder, tmp_path):
    "The tensor path (cache) and the DataLoader path (PIL workers) crop the same images with the same distribution."
    name, norm = f'folder:{ramp_folder}', dict(mean=(0., 0., 0.), std=(1., 1., 1.), img_size=32)
    small, large = get_dataset(name, 'train', tmp_path), get_dataset(name, 'train', tmp_path, cache=False)
    assert small.images is not None and large.images is None
    fr = {}
    for key, ds in (('tensor', small), ('loader', large)):
        ld = make_loader(ds, 50, METHODS['mae'].views, seed=1, num_workers=0, **norm)
        ws, hs = [], []
        for e in range(12):
            ld.set_epoch(e); w, h = crop_fractions(ld, 32); ws.append(w); hs.append(h)
        fr[key] = torch.cat(ws), torch.cat(hs)
    (wt, ht), (wl, hl) = fr['tensor'], fr['loader']
    crit = 1.95 * (2 / len(wt)) ** 0.5  # KS critical value, alpha = 0.001
    assert ks(wt.abs(), wl.abs()) < crit and ks(ht, hl) < crit and ks((wt * ht).abs(), (wl * hl).abs()) < crit
    assert abs((wt < 0).float().mean() - 0.5) < 0.05 and abs((wl < 0).float().mean() - 0.5) < 0.05  # flip rate
    # and the measurement can tell a different scale range apart
    far = sample_crops(len(wt), S, S, scale=(0.3, 1.0), generator=torch.Generator().manual_seed(0)).double()
    assert ks(wl.abs().double(), far[:, 3] / S) > crit

def test_worker_processes_are_deterministic(ramp_folder):
    "The DataLoader path gives the same batches with 0 or 2 worker processes, and with a resumed epoch."
    ds = get_dataset(f'folder:{ramp_folder}', 'train', cache=False, img_size=32)
    a = list(make_loader(ds, 20, METHODS['simclr'].views, seed=5, num_workers=0))
    l2 = make_loader(ds, 20, METHODS['simclr'].views, seed=5, num_workers=2)
    b = list(l2)
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert torch.equal(x['index'], y['index']) and all(torch.equal(u, v) for u, v in zip(x['views'], y['views']))
    l2.set_epoch(0, start_batch=3)
    c = list(l2)
    assert len(c) == 2 and torch.equal(c[0]['views'][0], a[3]['views'][0])

def test_sharding_and_resumption_over_an_epoch():
    ds = get_dataset('synthetic', 'train', n_per_class=100)
    ranks = [make_loader(ds, 16, METHODS['vicreg'].views, seed=7, rank=r, world_size=4) for r in range(4)]
    for l in ranks: l.set_epoch(3)
    idx = [torch.cat([b['index'] for b in l]) for l in ranks]
    assert len({len(l) for l in ranks}) == 1 and len(set(torch.cat(idx).tolist())) == sum(map(len, idx)) == 4 * 15 * 16
    full = list(ranks[2])
    ranks[2].set_epoch(3, start_batch=12)
    tail = list(ranks[2])
    assert len(tail) == len(full) - 12
    for x, y in zip(full[12:], tail):
        assert torch.equal(x['index'], y['index']) and torch.equal(x['views'][1], y['views'][1]) and torch.equal(x['label'], y['label'])

def test_pil_boxes_are_seeded_and_leave_global_rng():
    "pil_crop_boxes (sample_crops from its own generator) leaves the global RNG untouched and is a function of its seed."
    torch.manual_seed(0); before = torch.rand(1)
    torch.manual_seed(0); img = Image.new('RGB', (50, 40))
    b1 = pil_crop_boxes(img, [ViewAug()] * 2, 123); after = torch.rand(1)
    assert torch.equal(before, after) and b1 == pil_crop_boxes(img, [ViewAug()] * 2, 123) and b1[0] != b1[1]
