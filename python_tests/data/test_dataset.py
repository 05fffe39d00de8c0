"""EagleDataset on real photos and hostile records (each counted under its reason), JSON vs JSONL,
EXIF orientation, collation, the modality-length sampler across 2 ranks, packing equivalence, and
the memory of indexing a 200k-record JSONL."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from eagle_fast import EagleImageProcessor
from eagle_fast.data import REASONS, EagleCollator, EagleDataset, ModalityLengthSampler
from eagle_fast.data.records import RecordSource
from eagle_fast.model import EagleLlamaForCausalLM, presets


def _conv(q="What is shown?", a="A photo.", image=True):
    return [{"from": "human", "value": ("<image>\n" if image else "") + q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, real_photos):
    d = tmp_path_factory.mktemp("images")
    Image.fromarray(real_photos["china"]).save(d / "china.jpg", quality=90)
    Image.fromarray(real_photos["flower"]).convert("P").save(d / "flower.png")  # palette
    Image.fromarray(real_photos["grace_hopper"]).convert("RGBA").save(d / "hopper.png")
    rot = Image.fromarray(real_photos["china"][:100, :60])
    exif = rot.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    rot.save(d / "rotated.jpg", exif=exif)
    (d / "garbage.jpg").write_bytes(os.urandom(2000))
    full = (d / "china.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (d / "sub").mkdir()
    return d


GOOD = [
    {"id": "g0", "image": "china.jpg", "conversations": _conv()},
    {"id": "g1", "image": "flower.png", "conversations": _conv("Colour?", "Red.")},
    {"id": "g2", "conversations": _conv("Hi?", "Hello.", image=False)},
    {
        "id": "g3",
        "image": ["hopper.png", "rotated.jpg"],
        "conversations": [{"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "No."}],
    },
]
BAD = [
    ({"id": "b0", "image": "nope.jpg", "conversations": _conv()}, "missing_image"),
    ({"id": "b1", "image": "garbage.jpg", "conversations": _conv()}, "corrupt_image"),
    ({"id": "b2", "image": "truncated.jpg", "conversations": _conv()}, "corrupt_image"),
    ({"id": "b3", "image": "../../etc/passwd", "conversations": _conv()}, "path_escape"),
    ({"id": "b4", "image": "/etc/hostname", "conversations": _conv()}, "path_escape"),
    ({"id": "b5", "image": "china.jpg", "conversations": [{"from": "gpt", "value": "x"}]}, "bad_roles"),
    (
        {
            "id": "b6",
            "image": "china.jpg",
            "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}],
        },
        "image_count_mismatch",
    ),
    ({"id": "b7", "conversations": [{"from": "human", "value": "anyone?"}]}, "no_supervised_tokens"),
    ({"id": "b8", "image": "china.jpg", "conversations": _conv(q="word " * 300)}, "too_long"),
]


def _processor():
    return EagleImageProcessor.from_model_config(presets.get("eagle-tiny-x5"))


def _write(tmp_path, records, jsonl, extra_lines=()):
    path = tmp_path / ("data.jsonl" if jsonl else "data.json")
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(extra_lines))
    else:
        path.write_text(json.dumps(records, indent=2))
    return path


def _dataset(path, folder, tok, **kw):
    return EagleDataset(path, folder, tok, _processor(), "vicuna_v1", model_max_length=200, image_tokens=16, **kw)


@pytest.mark.parametrize("jsonl", [False, True])
def test_good_and_hostile_records_are_counted_by_reason(tmp_path, folder, llama_tokenizer, jsonl, caplog):
    path = _write(tmp_path, GOOD + [r for r, _ in BAD], jsonl, extra_lines=["{not json\n"] if jsonl else ())
    ds = _dataset(path, folder, llama_tokenizer, max_bad_fraction=1.0)
    items = [ds[i] for i in range(len(ds))]
    good = [it for it in items if "skipped" not in it]
    assert [it["id"] for it in good] == ["g0", "g1", "g2", "g3"]
    want = {r: 0 for r in REASONS}
    for _, reason in BAD:
        want[reason] += 1
    if jsonl:
        want["bad_json"] += 1
    assert ds.report() == want
    # each skip is logged with file, line and id
    assert any("data.json" in m and "'b3'" in m and "path_escape" in m for m in caplog.messages)
    g0, g2, g3 = good[0], good[2], good[3]
    assert g0["images"]["pixel_values"].shape == (1, 3, 64, 64) and (g0["input_ids"] == -200).sum() == 1
    assert g2["images"] is None and (g2["input_ids"] == -200).sum() == 0
    assert g3["images"]["pixel_values"].shape[0] == 2 and (g3["input_ids"] == -200).sum() == 2


def test_json_and_jsonl_give_identical_items(tmp_path, folder, llama_tokenizer):
    a = _dataset(_write(tmp_path, GOOD, False), folder, llama_tokenizer)
    b = _dataset(_write(tmp_path, GOOD, True), folder, llama_tokenizer)
    for i in range(len(GOOD)):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"]) and torch.equal(a[i]["labels"], b[i]["labels"])


def test_exif_orientation_is_applied(folder):
    from eagle_fast.images import load_image_file

    assert tuple(load_image_file("rotated.jpg", str(folder)).shape) == (60, 100, 3)  # stored 60 x 100, shown 100 x 60
    assert tuple(load_image_file("hopper.png", str(folder)).shape[2:]) == (3,)  # RGBA -> RGB


def test_a_flood_of_bad_records_is_an_error(tmp_path, folder, llama_tokenizer):
    path = _write(tmp_path, [r for r, _ in BAD] * 3 + GOOD, True)
    ds = _dataset(path, folder, llama_tokenizer, max_bad_fraction=0.2, min_seen=10)
    with pytest.raises(RuntimeError, match="were bad .* most common"):
        for i in range(len(ds)):
            ds[i]


def test_collator_pads_concatenates_images_and_reports_skips(tmp_path, folder, llama_tokenizer):
    ds = _dataset(_write(tmp_path, GOOD + [BAD[0][0]], True), folder, llama_tokenizer, max_bad_fraction=1.0)
    batch = EagleCollator(pad_token_id=0)([ds[i] for i in range(len(ds))])
    assert batch["skipped"] == [{"skipped": "missing_image", "id": "b0", "where": batch["skipped"][0]["where"]}]
    assert batch["input_ids"].shape[0] == 4 and batch["images"]["pixel_values"].shape[0] == 4  # 1+1+0+2 images
    p2s = batch["images"]["expert_inputs"]["pix2struct-1024"]
    assert p2s["flattened_patches"].shape[0] == 4 and p2s["attention_mask"].shape[0] == 4
    lens = batch["attention_mask"].sum(1)
    for i in range(4):
        assert (batch["labels"][i, lens[i] :] == -100).all() and (batch["input_ids"][i, lens[i] :] == 0).all()


def test_sampler_is_deterministic_and_balanced_across_two_ranks():
    rng = np.random.default_rng(0)
    lengths = np.where(rng.random(203) < 0.6, rng.integers(10, 500, 203), -rng.integers(5, 300, 203))
    ranks = [ModalityLengthSampler(lengths, batch_size=4, world_size=2, rank=r, seed=3) for r in (0, 1)]
    a, b = ranks[0].indices(), ranks[1].indices()
    assert a == ModalityLengthSampler(lengths, 4, 2, 0, seed=3).indices()  # deterministic
    assert len(a) == len(b)
    assert set(a) | set(b) == set(range(203))  # every record, padding repeats only
    ranks[0].set_epoch(1)
    assert ranks[0].indices() != a  # a new order each epoch
    for r in (a, b):  # modality-pure batches, except the final leftover megabatch
        batches = [r[i : i + 4] for i in range(0, len(r) - 8, 4)]
        assert all(len({lengths[j] > 0 for j in bt}) == 1 for bt in batches)


@pytest.mark.parametrize("attn", ["eagle_attention", "sdpa"])
def test_packing_gives_the_padded_batch_loss(tmp_path, folder, llama_tokenizer, attn):
    ds = _dataset(_write(tmp_path, GOOD, True), folder, llama_tokenizer)
    items = [ds[i] for i in range(len(ds))]
    torch.manual_seed(0)
    cfg = presets.get("eagle-tiny-x5", vocab_size=32000)
    model = EagleLlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(attn)
    padded = EagleCollator(pad_token_id=0)(items)
    packed = EagleCollator(pack=True)(items)
    loss_padded = model(
        padded["input_ids"], padded["attention_mask"], labels=padded["labels"], images=padded["images"]
    ).loss
    loss_packed = model(
        packed["input_ids"], labels=packed["labels"], images=packed["images"], packed_seq_lens=packed["packed_seq_lens"]
    ).loss
    assert torch.allclose(loss_padded, loss_packed, atol=1e-5), (loss_padded, loss_packed)


def test_indexing_200k_jsonl_records_stays_small(tmp_path):
    path = tmp_path / "big.jsonl"
    rec = json.dumps({"id": "x" * 8, "image": "a/b/c.jpg", "conversations": _conv("q " * 20, "a " * 40)})
    with open(path, "w") as f:
        for _ in range(200_000):
            f.write(rec + "\n")

    def rss():
        with open("/proc/self/status") as s:
            return next(int(line.split()[1]) for line in s if line.startswith("VmRSS")) * 1024

    before = rss()
    src = RecordSource(path)
    grown = rss() - before
    assert len(src) == 200_000 and src.read(199_999).data["id"] == "x" * 8
    assert grown < 200 << 20, f"indexing grew RSS by {grown / 2**20:.0f} MB"


def test_mixture_of_files_with_weights(tmp_path):
    from eagle_fast.data.records import open_source

    a = _write(tmp_path, [{"id": f"a{i}", "conversations": []} for i in range(10)], True)
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"id": f"b{i}", "conversations": []} for i in range(4)]))
    mix = open_source(f"{a}:0.5,{b}:2", seed=1)
    ids = [mix.read(i).data["id"] for i in range(len(mix))]
    assert len(ids) == 5 + 8
    assert sum(i.startswith("a") for i in ids) == 5 and len({i for i in ids if i.startswith("a")}) == 5
    assert sorted(i for i in ids if i.startswith("b")) == sorted([f"b{i}" for i in range(4)] * 2)
    assert ids == [open_source(f"{a}:0.5,{b}:2", seed=1).read(i).data["id"] for i in range(len(ids))]


def test_token_budget_batches_for_packing():
    from eagle_fast.data import TokenBudgetBatchSampler

    lengths = np.array([30, -50, 20, 200, 10, 40, -5])
    batches = list(TokenBudgetBatchSampler(range(7), lengths, max_tokens=100))
    assert batches == [[0, 1, 2], [3], [4, 5, 6]]  # the 200-row record alone
    assert all(sum(abs(lengths[i]) for i in b) <= 100 for b in batches if len(b) > 1)
    assert sorted(i for b in batches for i in b) == list(range(7))
