"""SDSS data-product paths: keywords -> path, path -> keywords, canonical keyword hashing, discovery globs.

Supported file types (``FILETYPES``; templates relative to the data root):

* ``apVisit``: ``apogee/{apred}/visit/{telescope}/{field}/{plate}/{mjd}/``
  ``apVisit-{apred}-{telescope}-{plate}-{mjd}-{fiber:03d}.fits``
* ``apStar``: ``apogee/{apred}/stars/{telescope}/{healpix//1000}/{healpix}/``
  ``apStar-{apred}-{telescope}-{obj}.fits``
* ``specFull``: ``boss/{run2d}/spectra/full/{fieldid:06d}{isplate}/{mjd}/``
  ``spec-{fieldid:06d}-{mjd}-{catalogid}.fits`` (``isplate`` is ``""`` or ``"p"``, default ``""``)
* ``mwmVisit`` / ``mwmStar``: ``mwm/{v_astra}/{run2d}-{apred}/spectra/{visit|star}/``
  ``{cat_id//100 % 100:02d}/{cat_id % 100:02d}/mwm{Visit|Star}-{v_astra}-{cat_id}.fits``

**Data-root layout.** SDSS keeps separate roots (``$APOGEE_REDUX``, ``$BOSS_SPECTRO_REDUX``, ``$MWM_ASTRA``).
Here a single *data root* holds one subtree per root: ``{root}/apogee`` (= ``$APOGEE_REDUX``), ``{root}/boss``
(= ``$BOSS_SPECTRO_REDUX``) and ``{root}/mwm`` (= ``$MWM_ASTRA``); see ``SUBTREES``. :func:`parse_path` only
matches the tail of a path below the subtree, so it also understands paths under the real SAS roots.

**Normalisation** (:func:`normalize_kwargs`): keys are lower-cased; integer keywords (``mjd``, ``fiber``,
``healpix``, ``fieldid``, ``catalogid``, ``cat_id``; ``plate`` when it is all digits) become ``int`` whatever
their input type (``"59000"``, ``59000``, ``59000.0``, numpy ints); string keywords are ``str``-ed and
stripped (APOGEE ``field`` values may carry whitespace). :func:`kwargs_hash` hashes the canonical JSON
(``sort_keys=True``) of the file type and the normalised keywords, so it does not depend on key order or on
``"59000"`` vs ``59000`` (Astra v0.2.6 bug #7).

This module imports only the standard library (and the stdlib-only :mod:`astra_provider.utils`): Airflow DAG
files import it at parse time.
"""

from __future__ import annotations

import glob as _glob
import math
import numbers
import os
import re
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astra_provider.utils import stable_hash

__all__ = [
    "FILETYPES",
    "SUBTREES",
    "FileType",
    "canonical_filetype",
    "normalize_kwargs",
    "kwargs_hash",
    "sdss_path",
    "parse_path",
    "split_data_root",
    "glob_pattern",
    "iter_products",
]

_INT = "int"
_STR = "str"
_PLATE = "plate"  # int when all digits, else stripped str


def _no_derived(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {}


def _apstar_derived(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {"healpix_group": kwargs["healpix"] // 1000}


def _mwm_derived(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    cat_id = kwargs["cat_id"]
    return {"cat_id_hi": (cat_id // 100) % 100, "cat_id_lo": cat_id % 100}


@dataclass(frozen=True)
class FileType:
    """Description of one SDSS file type.

    ``template`` is a :meth:`str.format` template relative to the subtree; it may use the keywords and the
    fields returned by ``derive`` (e.g. ``healpix_group``). ``regex`` matches the path tail (POSIX
    separators) and captures every keyword (directories and file name must agree, via back-references).
    """

    name: str
    subtree: str
    keywords: dict[str, str]
    template: str
    regex: re.Pattern[str]
    filename_regex: re.Pattern[str]
    defaults: dict[str, Any] = field(default_factory=dict)
    derive: Callable[[Mapping[str, Any]], dict[str, Any]] = _no_derived
    check: Callable[[Mapping[str, Any], Mapping[str, str]], bool] = lambda kwargs, groups: True

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(k for k in self.keywords if k not in self.defaults)


_SEG = r"[^/]+"
_TOKEN = r"[^/\-]+"  # a keyword that sits between '-' separators in a file name

_APVISIT = FileType(
    name="apVisit",
    subtree="apogee",
    keywords={"apred": _STR, "telescope": _STR, "field": _STR, "plate": _PLATE, "mjd": _INT, "fiber": _INT},
    template=(
        "{apred}/visit/{telescope}/{field}/{plate}/{mjd}/"
        "apVisit-{apred}-{telescope}-{plate}-{mjd}-{fiber:03d}.fits"
    ),
    regex=re.compile(
        rf"(?:^|/)(?P<apred>{_SEG})/visit/(?P<telescope>{_TOKEN})/(?P<field>{_SEG})/(?P<plate>{_TOKEN})/"
        rf"(?P<mjd>\d+)/apVisit-(?P=apred)-(?P=telescope)-(?P=plate)-(?P=mjd)-(?P<fiber>\d{{3,}})\.fits$"
    ),
    filename_regex=re.compile(r"^apVisit-.+-\d+-\d{3,}\.fits$"),
)

_APSTAR = FileType(
    name="apStar",
    subtree="apogee",
    keywords={"apred": _STR, "telescope": _STR, "healpix": _INT, "obj": _STR},
    template="{apred}/stars/{telescope}/{healpix_group}/{healpix}/apStar-{apred}-{telescope}-{obj}.fits",
    regex=re.compile(
        rf"(?:^|/)(?P<apred>{_SEG})/stars/(?P<telescope>{_TOKEN})/(?P<healpix_group>\d+)/(?P<healpix>\d+)/"
        rf"apStar-(?P=apred)-(?P=telescope)-(?P<obj>{_SEG})\.fits$"
    ),
    filename_regex=re.compile(r"^apStar-.+\.fits$"),
    derive=_apstar_derived,
    check=lambda kwargs, groups: int(groups["healpix_group"]) == kwargs["healpix"] // 1000,
)

_SPECFULL = FileType(
    name="specFull",
    subtree="boss",
    keywords={"run2d": _STR, "fieldid": _INT, "mjd": _INT, "catalogid": _INT, "isplate": _STR},
    template="{run2d}/spectra/full/{fieldid:06d}{isplate}/{mjd}/spec-{fieldid:06d}-{mjd}-{catalogid}.fits",
    regex=re.compile(
        rf"(?:^|/)(?P<run2d>{_SEG})/spectra/full/(?P<fieldid>\d{{6,}})(?P<isplate>p?)/(?P<mjd>\d+)/"
        r"spec-(?P=fieldid)-(?P=mjd)-(?P<catalogid>\d+)\.fits$"
    ),
    filename_regex=re.compile(r"^spec-\d+-\d+-\d+\.fits$"),
    defaults={"isplate": ""},
)


def _mwm_filetype(kind: str) -> FileType:
    name = f"mwm{kind.capitalize()}"
    return FileType(
        name=name,
        subtree="mwm",
        keywords={"v_astra": _STR, "run2d": _STR, "apred": _STR, "cat_id": _INT},
        template=(
            f"{{v_astra}}/{{run2d}}-{{apred}}/spectra/{kind}/{{cat_id_hi:02d}}/{{cat_id_lo:02d}}/"
            f"{name}-{{v_astra}}-{{cat_id}}.fits"
        ),
        regex=re.compile(
            rf"(?:^|/)(?P<v_astra>{_SEG})/(?P<run2d>{_TOKEN})-(?P<apred>{_SEG})/spectra/{kind}/"
            rf"(?P<cat_id_hi>\d\d)/(?P<cat_id_lo>\d\d)/{name}-(?P=v_astra)-(?P<cat_id>\d+)\.fits$"
        ),
        filename_regex=re.compile(rf"^{name}-.+-\d+\.fits$"),
        derive=_mwm_derived,
        check=lambda kwargs, groups: (
            _mwm_derived(kwargs)
            == {"cat_id_hi": int(groups["cat_id_hi"]), "cat_id_lo": int(groups["cat_id_lo"])}
        ),
    )


#: File types by canonical name.
FILETYPES: dict[str, FileType] = {
    ft.name: ft for ft in (_APVISIT, _APSTAR, _SPECFULL, _mwm_filetype("visit"), _mwm_filetype("star"))
}
#: Subtree of the data root that plays the role of each SDSS environment root.
SUBTREES: dict[str, str] = {"apogee": "APOGEE_REDUX", "boss": "BOSS_SPECTRO_REDUX", "mwm": "MWM_ASTRA"}

_BY_LOWER = {name.lower(): name for name in FILETYPES}


def canonical_filetype(filetype: str) -> str:
    """Return the canonical spelling of ``filetype`` (case-insensitive), or raise ``ValueError``."""
    try:
        return _BY_LOWER[str(filetype).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown SDSS filetype {filetype!r}; known: {sorted(FILETYPES)}") from None


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"keyword {key!r} must be an integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        result = int(value)
    elif isinstance(value, numbers.Real) and float(value).is_integer():
        result = int(math.trunc(value))
    elif isinstance(value, (str, bytes)):
        text = value.decode() if isinstance(value, bytes) else value
        text = text.strip()
        if not re.fullmatch(r"[+]?\d+", text):
            raise ValueError(f"keyword {key!r} must be an integer, got {value!r}")
        result = int(text)
    else:
        raise ValueError(f"keyword {key!r} must be an integer, got {value!r}")
    if result < 0:
        raise ValueError(f"keyword {key!r} must be non-negative, got {value!r}")
    return result


def _as_str(key: str, value: Any, allow_empty: bool = False) -> str:
    if isinstance(value, bytes):
        value = value.decode()
    text = str(value).strip()
    if not text and not allow_empty:
        raise ValueError(f"keyword {key!r} must be a non-empty string, got {value!r}")
    if "/" in text or "\\" in text:
        raise ValueError(f"keyword {key!r} must not contain a path separator, got {value!r}")
    return text


def _normalize_value(ft: FileType, key: str, value: Any) -> Any:
    kind = ft.keywords[key]
    if kind == _INT:
        return _as_int(key, value)
    if kind == _PLATE:
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
            return _as_int(key, value)
        text = _as_str(key, value)
        return int(text) if text.isdigit() else text
    text = _as_str(key, value, allow_empty=key in ft.defaults)
    if ft.name == "specFull" and key == "isplate" and text not in ("", "p"):
        raise ValueError(f"specFull: isplate must be '' or 'p', got {value!r}")
    return text


def normalize_kwargs(filetype: str, kwargs: Mapping[str, Any], strict: bool = True) -> dict[str, Any]:
    """Return the canonical keywords of a ``filetype`` product.

    Keys are lower-cased and stripped; integer keywords become ``int``; strings are stripped; optional
    keywords get their defaults (``specFull`` ``isplate=""``). Missing keywords raise ``ValueError``;
    unknown keywords raise too when ``strict`` (else they are dropped). The result is key-sorted.
    """
    ft = FILETYPES[canonical_filetype(filetype)]
    lowered: dict[str, Any] = {}
    for key, value in kwargs.items():
        lkey = str(key).strip().lower()
        if lkey in lowered:
            raise ValueError(f"{ft.name}: keyword {lkey!r} given more than once (case-insensitively)")
        lowered[lkey] = value
    unknown = sorted(set(lowered) - set(ft.keywords))
    if unknown and strict:
        raise ValueError(f"{ft.name}: unknown keyword(s) {unknown}; expected {sorted(ft.keywords)}")
    missing = [k for k in ft.required if k not in lowered or lowered[k] is None]
    if missing:
        raise ValueError(f"{ft.name}: missing keyword(s) {missing}; expected {sorted(ft.keywords)}")
    out: dict[str, Any] = {}
    for key in ft.keywords:
        value = lowered.get(key)
        out[key] = _normalize_value(ft, key, ft.defaults[key] if value is None else value)
    return dict(sorted(out.items()))


def kwargs_hash(filetype: str, kwargs: Mapping[str, Any]) -> str:
    """The identity of a product: the ``kwargs_hash`` of its ``astra.data_product`` row.

    ``stable_hash({"filetype": ..., **normalised kwargs})``: independent of key order, key case, surrounding
    whitespace and int-vs-str spelling of integer keywords.
    """
    name = canonical_filetype(filetype)
    return stable_hash({"filetype": name, **normalize_kwargs(name, kwargs)})


def sdss_path(filetype: str, root: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Path of a ``filetype`` product under the data ``root`` (``root/<subtree>/<template>``)."""
    ft = FILETYPES[canonical_filetype(filetype)]
    norm = normalize_kwargs(ft.name, kwargs)
    relative = ft.template.format(**norm, **ft.derive(norm))
    return Path(root) / ft.subtree / relative


def _match(path: str) -> tuple[FileType | None, dict[str, Any] | None, str]:
    """Return ``(filetype, kwargs, reason)``; ``filetype`` set if the file name looked like one."""
    posix = path.replace("\\", "/")
    name = posix.rsplit("/", 1)[-1]
    for ft in FILETYPES.values():
        if not ft.filename_regex.match(name):
            continue
        m = ft.regex.search(posix)
        if m is None:
            reason = f"file name looks like {ft.name} but the directories do not follow {ft.template!r}"
            return ft, None, reason
        groups = m.groupdict()
        raw = {k: groups[k] for k in ft.keywords if k in groups}
        try:
            kwargs = normalize_kwargs(ft.name, raw)
        except ValueError as exc:
            return ft, None, str(exc)
        if not ft.check(kwargs, groups):
            return ft, None, f"directories are inconsistent with the keywords of this {ft.name} file"
        return ft, kwargs, ""
    return None, None, f"file name {name!r} matches no SDSS filetype ({', '.join(FILETYPES)})"


def parse_path(path: str | os.PathLike[str], strict: bool = False) -> tuple[str, dict[str, Any]] | None:
    """Identify a product from its path: ``(filetype, normalised kwargs)``.

    Matches the file name and the directories below the data root (or below the SAS environment root).
    Returns ``None`` when nothing matches, or raises ``ValueError`` naming the path when ``strict``.
    """
    ft, kwargs, reason = _match(os.fspath(path))
    if ft is None or kwargs is None:
        if strict:
            raise ValueError(f"{os.fspath(path)}: not an SDSS data product path: {reason}")
        return None
    return ft.name, kwargs


def split_data_root(path: str | os.PathLike[str]) -> tuple[Path, str, dict[str, Any]]:
    """Return ``(data_root, filetype, kwargs)`` for a product path laid out by :func:`sdss_path`.

    Raises ``ValueError`` if the path does not parse or does not sit under ``<root>/<subtree>/``.
    """
    parsed = parse_path(path, strict=True)
    assert parsed is not None
    name, kwargs = parsed
    ft = FILETYPES[name]
    relative = Path(ft.template.format(**kwargs, **ft.derive(kwargs)))
    full = Path(path)
    depth = len(relative.parts)
    subtree_dir = Path(*full.parts[: len(full.parts) - depth]) if len(full.parts) > depth else Path()
    if subtree_dir.name != ft.subtree:
        raise ValueError(f"{full}: expected the {name} tree under a '{ft.subtree}/' directory of a data root")
    return subtree_dir.parent, name, kwargs


class _GlobFormatter(string.Formatter):
    """Formats a template, writing ``*`` for keywords that were not given."""

    def get_value(self, key: int | str, args: Any, kwargs: Mapping[str, Any]) -> Any:
        return kwargs.get(key, _WILDCARD) if isinstance(key, str) else super().get_value(key, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> str:
        if value is _WILDCARD:
            return "*"
        return _glob.escape(super().format_field(value, format_spec))


_WILDCARD = object()


def glob_pattern(filetype: str, root: str | os.PathLike[str], **kwargs: Any) -> str:
    """A :mod:`glob` pattern for ``filetype`` products under ``root``; given keywords are fixed.

    >>> glob_pattern("apStar", "/data", apred="1.3")
    '/data/apogee/1.3/stars/*/*/*/apStar-1.3-*-*.fits'
    """
    ft = FILETYPES[canonical_filetype(filetype)]
    given: dict[str, Any] = {}
    for key, value in kwargs.items():
        lkey = str(key).strip().lower()
        if lkey not in ft.keywords:
            raise ValueError(f"{ft.name}: unknown keyword {lkey!r}; expected {sorted(ft.keywords)}")
        given[lkey] = value
    fixed = {key: _normalize_value(ft, key, value) for key, value in given.items()}
    derived: dict[str, Any] = {}
    if ft.name == "apStar" and "healpix" in fixed or ft.name.startswith("mwm") and "cat_id" in fixed:
        derived = ft.derive(fixed)
    pattern = _GlobFormatter().format(ft.template, **fixed, **derived).replace("**", "*")
    root_text = _glob.escape(os.fspath(root))
    return f"{root_text.rstrip('/')}/{ft.subtree}/{pattern}" if root_text else f"{ft.subtree}/{pattern}"


def iter_products(
    filetype: str, root: str | os.PathLike[str], **kwargs: Any
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield ``(path, kwargs)`` for every ``filetype`` product under ``root`` (sorted by path).

    Files whose names match the glob but whose paths do not parse (or disagree with the fixed keywords)
    are skipped.
    """
    name = canonical_filetype(filetype)
    pattern = glob_pattern(name, root, **kwargs)
    want = {k.lower(): v for k, v in kwargs.items()}
    for text in sorted(_glob.glob(pattern)):
        parsed = parse_path(text)
        if parsed is None or parsed[0] != name:
            continue
        found = parsed[1]
        if want:
            fixed = normalize_kwargs(name, {**found, **want})
            if any(fixed[k] != found[k] for k in want):
                continue
        yield Path(text), found
