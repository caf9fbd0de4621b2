"""Classification metrics: accuracy, macro-F1, per-class precision / recall / F1, confusion matrix
(+ a PNG plot), and `lmforge eval` on a classifier checkpoint.

Definitions follow scikit-learn (a class never predicted has precision 0, never present recall 0;
macro-F1 averages the per-class F1 over every label the model has); tests check them against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from lmforge.errors import LMForgeError


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: list[str]) -> dict[str, Any]:
    """{"accuracy", "macro_f1", "per_class": {label: {precision, recall, f1, support}}, "confusion_matrix",
    "labels", "n"}; confusion_matrix[i][j] counts true label i predicted as j."""
    k = len(labels)
    t, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    tp = np.diag(cm).astype(np.float64)
    pred_n, true_n = cm.sum(0).astype(np.float64), cm.sum(1).astype(np.float64)
    prec = np.divide(tp, pred_n, out=np.zeros(k), where=pred_n > 0)
    rec = np.divide(tp, true_n, out=np.zeros(k), where=true_n > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(k), where=(prec + rec) > 0)
    per = {name: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(true_n[i])}
           for i, name in enumerate(labels)}
    return {"accuracy": float(tp.sum() / max(len(t), 1)), "macro_f1": float(f1.mean()) if k else 0.0,
            "per_class": per, "confusion_matrix": cm.tolist(), "labels": list(labels), "n": int(len(t))}


def plot_confusion(metrics: dict[str, Any], path: str | Path, title: str = "") -> None:
    """The confusion matrix as a PNG (rows: true label, columns: predicted), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    from lmforge.checkpoint import atomic_write_bytes

    cm = np.asarray(metrics["confusion_matrix"])
    labels = metrics["labels"]
    size = 2.5 + 0.5 * len(labels)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    hi = cm.max() if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > hi / 2 else "black")
    ax.set_title(title or f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _run_columns(path: Path) -> dict[str, Any]:
    """The data columns a `lmforge finetune classify` run was trained with (defaults otherwise)."""
    cols = {"text": "text", "pair": "text_pair", "label": "label"}
    for cand in (path / "config.yaml", path.parent.parent / "config.yaml"):
        if cand.is_file():
            from lmforge.config import load_yaml

            data = (load_yaml(cand) or {}).get("data") or {}
            cols = {"text": data.get("text_column", "text"), "pair": data.get("text_pair_column", "text_pair"),
                    "label": data.get("label_column", "label")}
            break
    return cols


def directory_given(path: Path) -> str:
    """The error for a directory where a classifier's labelled files belong, naming the ones inside."""
    from lmforge.data.table import FORMATS

    found = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
    example = "test.jsonl" if "test.jsonl" in found else (found[0] if found else "test.jsonl")
    inside = f"; it holds {', '.join(found)}" if found else "; it holds none"
    return (f"{path} is a directory; a classifier is evaluated on labelled CSV/TSV/JSONL files (a text and a label "
            f"column), e.g. --data {path / example}{inside}")


def evaluate_classifier(ckpt: Any, data: Sequence[str] | str, batch_size: int = 32,
                        columns: Optional[dict[str, Any]] = None, progress: bool = False) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class figures and the confusion matrix of a classifier (an LLM, or the
    path of one) on labelled files; `progress` shows a bar of the batches on stderr."""
    from lmforge.data.labeled import label_ids, read_labeled
    from lmforge.infer.classify import class_logits, label_names
    from lmforge.infer.llm import LLM

    files = [data] if isinstance(data, (str, Path)) else list(data)
    for f in files:
        if Path(f).is_dir():
            raise LMForgeError(directory_given(Path(f)))
    llm = LLM.of(ckpt)
    cols = columns or _run_columns(Path(llm.path))
    labels = label_names(llm.model)
    examples = [e for f in files for e in read_labeled(f, cols["text"], cols["pair"], cols["label"])]
    if len(labels) == 1:
        raise LMForgeError("this model is a regression / reward model (one output); classification metrics need classes")
    y = label_ids(examples, labels)
    pairs = [e.pair for e in examples] if any(e.pair for e in examples) else None
    logits, cut = class_logits(llm.model, llm.tokenizer, [e.text for e in examples], pairs, batch_size,
                               progress=progress)
    result = classification_metrics(y, logits.argmax(-1).tolist(), labels)
    result["truncated"] = cut
    result["data"] = [str(f) for f in files]
    return result
