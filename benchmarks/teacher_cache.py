"""Offline top-k teacher cache vs the online teacher, on the embedded benchmark's data (CPU).

Measures, in one process and on the same data:

* the KD epoch time (training only) with the online teacher and with the top-k cache, a teacher of
  about 8× the student's non-embedding parameters; the cache build time is reported apart;
* the KD loss with the top-k signal (k = 64) against the dense teacher on the whole training set
  (FKL and the kd objective 0.5·CE + 0.5·FKL), for the initial student and a KD-trained one.

Usage: ``python benchmarks/teacher_cache.py [--out DIR] [--repeats 2] [--threads 1]``. Prints a
Markdown table and writes ``teacher_cache.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="Folder for the runs and the JSON result (default: a temp dir).")
    parser.add_argument("--repeats", type=int, default=2, help="Timed epochs per signal (the fastest is reported).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU).")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--teacher-steps", type=int, default=300, help="SFT steps that make the teacher informative.")
    options = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from kdbench.models import count_parameters, make_model
    from kdbench.synthetic.corpus import FILES, CorpusConfig, build_corpus
    from kdbench.train import TrainConfig, train

    torch.set_num_threads(options.threads)
    out = Path(options.out) if options.out else Path(tempfile.mkdtemp(prefix="kdbench-teacher-cache-"))
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus"
    if not (corpus / FILES["student_train"]).exists():
        corpus.mkdir(exist_ok=True)
        build_corpus(CorpusConfig(), corpus)
    tokenizer = AutoTokenizer.from_pretrained(str(corpus / "tokenizer"))

    student = make_model("gpt2-mini", tokenizer, seed=0, max_positions=256)  # 4 layers × 128
    student.save_pretrained(str(out / "student"))
    tokenizer.save_pretrained(str(out / "student"))
    teacher_config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=256, n_layer=8, n_head=8,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                tie_word_embeddings=True)
    torch.manual_seed(0)
    GPT2LMHeadModel(teacher_config).save_pretrained(str(out / "teacher-init"))
    tokenizer.save_pretrained(str(out / "teacher-init"))
    ratio = (count_parameters(GPT2LMHeadModel(teacher_config), non_embedding=True)
             / count_parameters(student, non_embedding=True))

    common = dict(prompt_style="compact", max_prompt_length=128, max_length=256, batch_size=16, save_steps=100000,
                  logging_steps=50, cache_dir=str(out / "store"))
    started = time.time()
    teacher = train(TrainConfig(method="sft", student=str(out / "teacher-init"), data=str(corpus / FILES["teacher_train"]),
                                valid_data=str(corpus / FILES["validation"]), output_dir=str(out / "runs"),
                                run_name="teacher", max_steps=options.teacher_steps, learning_rate=1e-3, **common),
                    progress=False)
    teacher_seconds = time.time() - started
    data = dict(student=str(out / "student"), teacher=str(teacher.model_dir), data=str(corpus / FILES["student_train"]),
                valid_data=str(corpus / FILES["validation"]), output_dir=str(out / "runs"), num_epochs=1.0,
                learning_rate=1e-3, **common)

    timings: dict[str, list[float]] = {"online": [], "topk": []}
    results = {}
    for repeat in range(options.repeats):
        for signal in ("online", "topk"):
            name = f"kd-{signal}-{repeat}"
            shutil.rmtree(out / "runs" / name, ignore_errors=True)
            result = train(TrainConfig(method="kd", run_name=name, teacher_signal=signal, teacher_topk=options.k, **data),
                           progress=False)
            timings[signal].append(result.cost["train_seconds"])
            results[signal] = result
    build = results["topk"].cost

    dense_vs_sparse = _loss_gap(out, corpus, FILES, tokenizer, Path(teacher.model_dir), results["online"].model_dir,
                                options.k)
    figures = {
        "machine": f"{platform.machine()}, torch threads {options.threads}",
        "student_non_embedding_parameters": count_parameters(student, non_embedding=True),
        "teacher_to_student_non_embedding_ratio": round(ratio, 2),
        "vocabulary": len(tokenizer),
        "k": options.k,
        "train_examples": results["online"].cost["train_examples"],
        "optimizer_steps_per_epoch": results["online"].cost["optimizer_steps"],
        "teacher_sft_seconds": round(teacher_seconds, 1),
        "epoch_seconds_online": round(min(timings["online"]), 2),
        "epoch_seconds_topk": round(min(timings["topk"]), 2),
        "epoch_seconds_all": timings,
        "speedup": round(min(timings["online"]) / min(timings["topk"]), 2),
        "cache_build_seconds": _first_build_seconds(out),
        "cache_bytes": build.get("teacher_cache_bytes"),
        "validation_loss_online": results["online"].validation["loss"],
        "validation_loss_topk": results["topk"].validation["loss"],
        "validation_ce_online": results["online"].validation["ce"],
        "validation_ce_topk": results["topk"].validation["ce"],
        **dense_vs_sparse,
    }
    (out / "teacher_cache.json").write_text(json.dumps(figures, indent=1))
    print(_markdown(figures))
    print(f"\nresults: {out / 'teacher_cache.json'}")


def _first_build_seconds(out: Path) -> float | None:
    """Build time of the training-set cache, from the artifact store's marker (repeats reuse it)."""
    times = []
    for marker in (out / "store" / "teacher-topk").glob("*/COMPLETE*"):
        try:
            times.append(json.loads(marker.read_text())["build_seconds"])
        except (OSError, ValueError, KeyError):
            continue
    return round(sum(times), 2) if times else None


def _loss_gap(out, corpus, FILES, tokenizer, teacher_dir: Path, trained_dir: Path, k: int) -> dict:
    """Dense vs top-k FKL and kd objective (token means over the training set) for two students."""
    import torch

    from kdbench.data import PadCollator, build_dataset, load_examples
    from kdbench.losses import SparseTeacher, fkl
    from kdbench.models import load_model
    from kdbench.train.objectives import cross_entropy_sum

    dataset = build_dataset(load_examples(corpus / FILES["student_train"]), tokenizer, style="compact",
                            max_prompt_length=128, max_length=256)
    teacher = load_model(teacher_dir, trainable=False)
    collate = PadCollator(tokenizer.pad_token_id)
    figures = {}
    for label, student_dir in (("initial", out / "student"), ("kd_trained", trained_dir)):
        student = load_model(student_dir, trainable=False)
        sums = {"fkl_dense": 0.0, "fkl_topk": 0.0, "ce": 0.0, "tokens": 0.0, "rest_mass": 0.0}
        with torch.no_grad():
            for start in range(0, len(dataset), 32):
                batch = collate([dataset[i] for i in range(start, min(start + 32, len(dataset)))])
                mask = (batch["labels"][:, 1:] != -100).float()
                s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                sparse = SparseTeacher.from_logits(t, k)
                sums["fkl_dense"] += float(fkl(s, t, mask, reduction="sum"))
                sums["fkl_topk"] += float(fkl(s, sparse, mask, reduction="sum"))
                sums["ce"] += float(cross_entropy_sum(s, batch["labels"][:, 1:]))
                sums["rest_mass"] += float((sparse.rest_logprob.exp() * mask).sum())
                sums["tokens"] += float(mask.sum())
        n = sums["tokens"]
        dense, topk, ce = sums["fkl_dense"] / n, sums["fkl_topk"] / n, sums["ce"] / n
        figures[f"{label}_fkl_dense"] = dense
        figures[f"{label}_fkl_topk"] = topk
        figures[f"{label}_kd_loss_dense"] = 0.5 * ce + 0.5 * dense
        figures[f"{label}_kd_loss_topk"] = 0.5 * ce + 0.5 * topk
        figures[f"{label}_mean_rest_mass"] = sums["rest_mass"] / n
    return figures


def _markdown(f: dict) -> str:
    rows = [
        ("machine", f["machine"]),
        ("teacher / student non-embedding parameters", f"{f['teacher_to_student_non_embedding_ratio']}×"),
        ("vocabulary, k", f"{f['vocabulary']}, {f['k']}"),
        ("one KD epoch", f"{f['train_examples']} examples, {f['optimizer_steps_per_epoch']} steps of 16"),
        ("epoch time, online teacher", f"{f['epoch_seconds_online']} s"),
        ("epoch time, top-k cache", f"{f['epoch_seconds_topk']} s"),
        ("speed-up", f"{f['speedup']}×"),
        ("cache build (once, train + validation)", f"{f['cache_build_seconds']} s, {f['cache_bytes']} bytes (train)"),
        ("KD loss, initial student: dense / top-k", f"{f['initial_kd_loss_dense']:.4f} / {f['initial_kd_loss_topk']:.4f}"),
        ("KD loss, trained student: dense / top-k", f"{f['kd_trained_kd_loss_dense']:.4f} / {f['kd_trained_kd_loss_topk']:.4f}"),
        ("FKL, trained student: dense / top-k", f"{f['kd_trained_fkl_dense']:.4f} / {f['kd_trained_fkl_topk']:.4f}"),
        ("mean teacher mass outside the top-k", f"{f['kd_trained_mean_rest_mass']:.2e}"),
        ("validation CE after the epoch: online / top-k", f"{f['validation_ce_online']:.4f} / {f['validation_ce_topk']:.4f}"),
    ]
    return "| figure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


if __name__ == "__main__":
    main()
