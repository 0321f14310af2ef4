"""The two models of a run (segmenter and classifier) and loading them from a models directory."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.errors import ModelError
from engine.models.manifest import (
    ROLES,
    Manifest,
    Role,
    load_manifest,
    manifest_path,
    tta_digest,
    verify_onnx,
)
from engine.models.precision import at_precision, choose_precision, why_chosen

# Where trained default models ship inside the package (filled by `cxr train`, issue 3).
PACKAGED_MODELS = Path(__file__).parents[1] / "shipped_models"


@dataclass(frozen=True, kw_only=True)
class ModelSet:
    segmenter: Manifest
    classifier: Manifest
    # role -> why that export runs (why_precision), filled by load_models
    precision_why: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def model_id(self) -> str:
        s, c = self.segmenter, self.classifier
        # the box rule changes the crops, so it is part of what wrote a row (resume compares)
        rule = f"/box{s.box_min_region:g}" if s.box_min_region else ""
        # so are the box transforms of test-time crops (their values: a hash of them)
        tta = f"/tta{len(c.tta)}@{tta_digest(c.tta)}" if c.tta else ""
        return (
            f"{c.architecture}-{c.precision}@{c.sha256[:8]}{tta}"
            f"+{s.architecture}-{s.precision}@{s.sha256[:8]}{rule}"
        )

    @property
    def trained(self) -> bool:
        return self.segmenter.trained and self.classifier.trained

    def with_threshold(self, threshold: float | None) -> ModelSet:
        if threshold is None:
            return self
        return replace(self, classifier=replace(self.classifier, threshold=threshold))


def load_models(models_dir: Path | None, *, precision: str = "auto") -> ModelSet:
    """Load the segmenter and classifier manifests of a models directory (default: packaged)."""
    directory = Path(models_dir) if models_dir is not None else PACKAGED_MODELS
    if models_dir is None and not manifest_path(directory, "classifier").is_file():
        raise ModelError(
            "no models given and no trained default models are installed in "
            f"{directory}. Export the (untrained) architectures with "
            "`cxr models init --out models` and pass `--models models`; trained default "
            "models ship with the package once `cxr train` has produced them."
        )
    if not directory.is_dir():
        raise ModelError(f"{directory}: models directory not found")
    raw = {role: load_manifest(manifest_path(directory, role), verify=False) for role in ROLES}
    # An explicit precision applies to every model exported at it; the others keep their
    # reference export (today only the classifier has an INT8 variant).
    explicit = precision not in ("auto", "fp32")
    if explicit and not any(precision in (m.precision, *m.variants) for m in raw.values()):
        choose_precision(raw["classifier"], precision)  # raises, listing what exists
    seg = verify_onnx(
        at_precision(raw["segmenter"], precision), manifest_path(directory, "segmenter")
    )
    clf = verify_onnx(
        at_precision(raw["classifier"], precision), manifest_path(directory, "classifier")
    )
    roles: tuple[tuple[Manifest, Role], ...] = ((seg, "segmenter"), (clf, "classifier"))
    for m, role in roles:
        if m.role != role:  # a manifest copied under the other role's name
            raise ModelError(f"{manifest_path(directory, role)}: role is {m.role!r}, not {role!r}")
    why: dict[str, str] = {role: why_chosen(raw[role], m, precision) for m, role in roles}
    return ModelSet(segmenter=seg, classifier=clf, precision_why=why)
