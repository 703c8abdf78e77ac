"""Hugging Face Hub checkpoints and VAEs: `hf://OWNER/REPO[/PATH][@REVISION]` -> a file in the Hub cache.

Torch-free (build resolves its inputs, and computes their provenance, before it decides whether to export):
only `huggingface_hub` is imported, inside the functions.

    --ckpt hf://MCG-NJU/DDT-XL-22en6de-R256                 the repo's one .ckpt / .pt / .safetensors
    --ckpt hf://MCG-NJU/DDT-XL-22en6de-R256/model.ckpt@main a named file at a revision (branch, tag, commit)
    --vae  hf://stabilityai/sd-vae-ft-ema                    config.json + the weights diffusers loads
    --vae  hf://OWNER/REPO/vae@REV                           ... in a subfolder

The revision is resolved to a commit once (`HfApi.resolve_revision`: the Hub, else the cache's refs/), and
every file is fetched at that commit (`hf_hub_download`), so a repo updated meanwhile cannot mix two commits.
With no PATH the repo's file list is read (the Hub's, or offline the cached snapshot's). huggingface_hub
itself reads HF_HUB_OFFLINE, HF_HOME / HF_HUB_CACHE and HF_TOKEN; nothing here overrides them. Each file's
sha256 is computed here (it is the weights' provenance identity) and checked against the cache's blob name
where that name is one (LFS files). Every failure is one typed error naming the repo and the file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..core.artifacts import sha256_file, sha256_files
from ..core.errors import ArtifactError, BackendError, CheckpointError, InputError
from ..core.log import Say
from ..core.provenance import FolderRef, Source

PREFIX = "hf://"
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".safetensors")
VAE_CONFIG = "config.json"
VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # diffusers' preference
FORM = {"--ckpt": "hf://OWNER/REPO[/PATH][@REVISION]", "--vae": "hf://OWNER/REPO[/SUBFOLDER][@REVISION]"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_hub(spec) -> bool:
    """hf://... (also as a Path made of it: pathlib folds the double slash to hf:/...)."""
    return spec is not None and str(spec).startswith("hf:/")


def _normal(spec) -> str:
    text = str(spec)
    return text if text.startswith(PREFIX) else PREFIX + text.removeprefix("hf:/")


@dataclass(frozen=True)
class HubRef:
    """A parsed hf:// reference: repo id, path inside the repo ("" = not given), revision (None = main)."""

    repo: str
    path: str
    revision: str | None

    @staticmethod
    def parse(spec: str, flag: str = "--ckpt") -> "HubRef":
        spec = _normal(spec) if is_hub(spec) else str(spec)
        body, at, rev = spec.removeprefix(PREFIX).partition("@")
        parts = body.strip("/").split("/")
        if not spec.startswith(PREFIX) or len(parts) < 2 or not all(_NAME.fullmatch(p) for p in parts[:2]) \
                or (at and not rev) or any(p in ("", ".", "..") for p in parts[2:]):
            raise InputError(flag, FORM.get(flag, FORM["--ckpt"]), spec)
        return HubRef(f"{parts[0]}/{parts[1]}", "/".join(parts[2:]), rev or None)

    def url(self, file: str | None = None) -> str:
        path = self.path if file is None else file
        return PREFIX + self.repo + (f"/{path}" if path else "") + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class HubFile:
    """One file fetched into the Hub cache: where it is, what it is (sha256), where it came from."""

    path: Path
    repo: str
    file: str
    revision: str  # the commit sha it was fetched at
    sha256: str

    @property
    def hub(self) -> dict:
        return {"repo": self.repo, "file": self.file, "revision": self.revision, "sha256": self.sha256}

    @property
    def source(self) -> Source:
        return Source(path=str(self.path), hub=self.hub)


def _hf():
    try:
        import huggingface_hub
    except ImportError as e:
        raise BackendError("hf:// paths", "huggingface_hub importable (the [export] extra)", repr(e))
    return huggingface_hub


def _offline() -> bool:
    _hf()
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _hub_error(e: Exception, ref: HubRef, file: str | None, flag: str) -> Exception:
    """huggingface_hub's exception -> one typed error naming the repo and the file."""
    from huggingface_hub import errors

    what = f"{flag} {ref.url(file)}"
    rev = ref.revision or "main"
    if isinstance(e, (errors.LocalEntryNotFoundError, errors.RevisionResolutionError,
                      errors.OfflineModeIsEnabled)):
        if _offline():
            return CheckpointError(what, "a file in the local Hugging Face cache (HF_HUB_OFFLINE is set: no network)",
                                   f"{ref.repo}: {file or 'revision ' + rev} is not cached",
                                   "fetch it once with network access, or unset HF_HUB_OFFLINE")
        return CheckpointError(what, "reachable on the Hub or cached", f"not cached, and {_first_line(e)}",
                               "check the network, or set HF_HUB_OFFLINE=1 to use the cache only")
    if isinstance(e, errors.GatedRepoError):
        return CheckpointError(what, "a repo this token may read", f"{ref.repo} is gated",
                               "accept its terms on the Hub and set HF_TOKEN")
    if isinstance(e, errors.RepositoryNotFoundError):
        return CheckpointError(what, "an existing repo", f"no repo {ref.repo} (or it is private)",
                               "check the name; private repos need HF_TOKEN")
    if isinstance(e, errors.RevisionNotFoundError):
        return CheckpointError(what, f"a revision of {ref.repo}", f"no revision {rev}")
    if isinstance(e, errors.EntryNotFoundError):
        return CheckpointError(what, f"a file of {ref.repo} at {rev}", f"no file {file}")
    return CheckpointError(what, "a file the Hub serves", _first_line(e))


def _commit(ref: HubRef, flag: str) -> str:
    """The commit the revision points at: asked of the Hub, else read from the cache's refs/ (as offline)."""
    hf = _hf()
    try:
        return hf.HfApi().resolve_revision(ref.repo, revision=ref.revision, local_files_only=_offline()).resolved
    except Exception as e:  # noqa: BLE001 - every huggingface_hub failure becomes one typed line
        raise _hub_error(e, ref, None, flag) from None


def _snapshot(ref: HubRef, commit: str) -> Path:
    _hf()
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=ref.repo, repo_type="model") / "snapshots" / commit


def list_files(ref: HubRef, commit: str, flag: str = "--ckpt", say: Say | None = None) -> list[str]:
    """The repo's files at `commit`: the Hub's list, or (offline, or the Hub unreachable) the cached snapshot's."""
    hf = _hf()
    from huggingface_hub.errors import HfHubHTTPError

    if not _offline():
        try:
            return sorted(hf.HfApi().list_repo_files(ref.repo, revision=commit))
        except HfHubHTTPError as e:
            raise _hub_error(e, ref, None, flag) from None
        except Exception as e:  # noqa: BLE001 - unreachable: fall back on the cache, as huggingface_hub does
            if say:
                say(f"the Hub could not be reached ({_first_line(e)}); listing the cached snapshot of {ref.repo}")
    snap = _snapshot(ref, commit)
    if not snap.is_dir():
        raise CheckpointError(f"{flag} {ref.url()}", "a cached snapshot of the repo (no network)",
                              f"no snapshot {commit[:12]} of {ref.repo} in {snap.parent.parent.parent}",
                              "fetch it once with network access, or name the file")
    return sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file())


def fetch(ref: HubRef, file: str, commit: str, flag: str = "--ckpt") -> HubFile:
    """`file` of the repo at `commit` into the cache (or found there); its sha256 checked against an LFS blob."""
    hf = _hf()
    try:
        path = Path(hf.hf_hub_download(ref.repo, file, revision=commit))
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, ref, file, flag) from None
    digest = sha256_file(path)
    blob = path.resolve().name
    if _SHA256.fullmatch(blob) and blob != digest:
        raise ArtifactError(f"{flag} {ref.url(file)}: cached file {path}", f"sha256 {blob[:12]} (its blob name)",
                            f"sha256 {digest[:12]}", "the cache is corrupt: delete the blob and fetch it again")
    return HubFile(path, ref.repo, file, commit, digest)


def resolve_checkpoint(spec: str, say: Say | None = None) -> HubFile:
    """`--ckpt hf://...` -> the checkpoint in the cache. No PATH: the repo's one .ckpt/.pt/.safetensors."""
    ref = HubRef.parse(spec, "--ckpt")
    commit = _commit(ref, "--ckpt")
    file = ref.path
    if not file:
        files = list_files(ref, commit, "--ckpt", say)
        found = [f for f in files if f.endswith(CHECKPOINT_SUFFIXES)]
        if len(found) != 1:
            listed = ", ".join(found) if found else f"none among {len(files)} files"
            raise CheckpointError(f"--ckpt {ref.url()}", f"exactly one {' / '.join(CHECKPOINT_SUFFIXES)} file",
                                  listed, f"name one: {PREFIX}{ref.repo}/FILE")
        file = found[0]
    got = fetch(ref, file, commit, "--ckpt")
    if say:
        say(f"checkpoint {ref.repo}/{file} at commit {commit[:12]} (sha256 {got.sha256[:12]})")
    return got


def resolve_vae(spec: str, say: Say | None = None) -> FolderRef:
    """`--vae hf://...` -> the diffusers AutoencoderKL folder in the cache: config.json and the one weights file
    diffusers loads (safetensors before .bin). Its identity is over those two files only, so other files of
    the same snapshot in the cache do not change it."""
    ref = HubRef.parse(spec, "--vae")
    commit = _commit(ref, "--vae")
    sub = ref.path
    files = set(list_files(ref, commit, "--vae", say))
    join = (lambda f: f"{sub}/{f}") if sub else (lambda f: f)
    weights = next((join(w) for w in VAE_WEIGHTS if join(w) in files), None)
    if join(VAE_CONFIG) not in files or weights is None:
        raise CheckpointError(f"--vae {ref.url()}", f"a diffusers AutoencoderKL folder ({VAE_CONFIG} and "
                              f"{' or '.join(VAE_WEIGHTS)})", f"{len(files)} files without them",
                              "name the subfolder: hf://OWNER/REPO/SUBFOLDER")
    got = [fetch(ref, f, commit, "--vae") for f in (join(VAE_CONFIG), weights)]
    folder = got[0].path.parent
    if say:
        say(f"VAE {ref.repo}{'/' + sub if sub else ''} at commit {commit[:12]}")
    identity = sha256_files([g.path for g in got], folder)
    hub = {"repo": ref.repo, "subfolder": sub, "revision": commit, "files": {g.file: g.sha256 for g in got}}
    return FolderRef(str(folder), identity, hub)


def checkpoint_source(ckpt, say: Say | None = None) -> tuple[Path, str, Source]:
    """`--ckpt` as export and build take it (a local path or hf://...) -> (local file, sha256, Source)."""
    if is_hub(ckpt):
        got = resolve_checkpoint(str(ckpt), say)
        return got.path, got.sha256, got.source
    path = Path(ckpt)
    if not path.is_file():
        raise CheckpointError("--ckpt", "an existing file or hf://OWNER/REPO[/PATH][@REVISION]", str(ckpt))
    return path, sha256_file(path), Source(path=str(path.resolve()))


def vae_folder(vae, say: Say | None = None):
    """`--vae` as export and build take it: None, a local folder (Path) or hf://... (a FolderRef)."""
    if vae is None or isinstance(vae, FolderRef):
        return vae
    if is_hub(vae):
        return resolve_vae(str(vae), say)
    if not Path(vae).is_dir():
        raise InputError("--vae", "a local diffusers AutoencoderKL folder or hf://OWNER/REPO[/SUBFOLDER]", str(vae))
    return Path(vae)
