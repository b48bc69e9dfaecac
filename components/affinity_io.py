"""Reading and writing the Stage III/IV tables: per-image losses and affinities, Parquet or CSV.

A source set is a set: `b+a` and `a+b`, or `["b", "a"]` and `["a", "b"]`, are the same one. Parquet
files carry `sources` as a list column; CSV files as a `+`-joined string (the released Taskonomy
format, `target,sources,order,value`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from components.errors import TaskatlasError
from components.transfer_table import TransferTable
from components.vocabulary import LOSS_COLUMNS, REPLICATE

# The loss table's columns (REPLICATE is optional: which training of the readout; absent: replicate 0)
# Read from Parquet as dictionaries, as stored: a target's table repeats each value thousands of
# times, and Stage III only needs their codes (about half of reading + arranging a target's table).
DICTIONARY_COLUMNS = ("target", "image_id", "sources.list.element")  # the last: a list's names
AFFINITY_VALUE_COLUMNS = ("affinity", "value")  # ours, then the released Taskonomy CSVs'
_PARQUET_SUFFIXES = (".parquet", ".pq")


def read_table(path: str | Path, columns: Sequence[str]) -> pa.Table:
    """A Parquet or CSV file (by suffix) with at least `columns`; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise TaskatlasError(f"{path}: no such file")
    try:
        if path.suffix.lower() in _PARQUET_SUFFIXES:
            table = pq.read_table(path, read_dictionary=list(DICTIONARY_COLUMNS))
        elif path.suffix.lower() == ".csv":
            text_types = {name: pa.string() for name in ("target", "sources")}
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=text_types))
        else:
            raise TaskatlasError(f"{path}: expected a .parquet or .csv file")
    except (pa.ArrowInvalid, OSError) as err:
        raise TaskatlasError(f"{path}: cannot read: {err}") from None
    if missing := [c for c in columns if c not in table.column_names]:
        raise TaskatlasError(
            f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(table.column_names)})"
        )
    return table


def factorize(column: pa.ChunkedArray | pa.Array, name: str) -> tuple[np.ndarray, list]:
    """(codes, sorted unique values): codes[i] indexes the value of row i."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        raise TaskatlasError(f"column {name!r} has {array.null_count} missing value(s)")
    if pa.types.is_dictionary(array.type):  # read as stored: no hashing, but drop unused values
        codes = array.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        used = np.flatnonzero(np.bincount(codes, minlength=len(array.dictionary)))
        uniques = array.dictionary.take(pa.array(used)).to_pylist()
        if len(set(uniques)) < len(uniques):  # a dictionary may repeat a value
            return factorize(array.dictionary_decode(), name)
        compact = np.zeros(len(array.dictionary), dtype=np.int64)
        compact[used] = np.arange(len(used))
        codes = compact[codes]
    else:
        encoded = pc.dictionary_encode(array)
        codes, uniques = encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary.to_pylist()
    order = np.argsort(np.array(uniques, dtype=object), kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank[codes], [uniques[i] for i in order]


def source_sets(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """(codes, sorted unique source sets as sorted tuples) for a list or `+`-joined string column."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        if pa.types.is_dictionary(column.type.value_type):  # as Parquet readers may give it
            if (fast := _dictionary_source_sets(column)) is not None:
                return fast
            column = column.cast(pa.list_(column.type.value_type.value_type))
        column = pc.binary_join(column, "+")
    text_type = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise TaskatlasError(
            f"column 'sources' must be a list of strings or a '+'-joined string, not {column.type}"
        )
    codes, raw = factorize(column, "sources")
    sets = [tuple(sorted({part.strip() for part in text.split("+")} - {""})) for text in raw]
    if empty := [text for text, s in zip(raw, sets, strict=True) if not s]:
        raise TaskatlasError(f"column 'sources' has an empty source set: {empty[0]!r}")
    uniques = sorted(set(sets))
    index = {s: i for i, s in enumerate(uniques)}
    return np.array([index[s] for s in sets], dtype=np.int64)[codes], uniques


def _dictionary_source_sets(
    column: pa.ChunkedArray | pa.Array,
) -> tuple[np.ndarray, list[tuple[str, ...]]] | None:
    """`source_sets` of a list of dictionary-encoded names (Parquet read with the list's elements
    as a dictionary) from the codes alone, without joining a string per row: a row's set is the
    bitwise or of its names' bits, and equal neighbours (a table's rows come grouped) are found
    once. None where the general path must decide (missing values, empty lists, names with spaces
    or `+`, more than 62 names): it gives the same answer, or the error."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if not chunks or any(c.null_count or c.values.null_count for c in chunks):
        return None
    names = sorted({name for c in chunks for name in c.values.dictionary.to_pylist()})
    if len(names) > 62 or any(not name or name != name.strip() or "+" in name for name in names):
        return None
    index = {name: i for i, name in enumerate(names)}
    keys = []
    for chunk in chunks:
        lengths = pc.list_value_length(chunk).to_numpy(zero_copy_only=False)
        if (lengths == 0).any():
            return None
        flat = chunk.flatten()  # the elements of the chunk's rows, in order
        bit = np.array([1 << index[name] for name in flat.dictionary.to_pylist()], dtype=np.int64)
        bits = bit[flat.indices.to_numpy(zero_copy_only=False)]
        keys.append(np.bitwise_or.reduceat(bits, np.cumsum(lengths) - lengths) if len(bits) else bits)
    keys = np.concatenate(keys)
    starts = np.flatnonzero(np.diff(keys, prepend=keys[:1] - 1))  # runs of equal sets
    uniques, run_code = np.unique(keys[starts], return_inverse=True)
    inverse = np.repeat(run_code.ravel(), np.diff(np.append(starts, len(keys))))
    sets = [tuple(name for i, name in enumerate(names) if key >> i & 1) for key in uniques.tolist()]
    order = sorted(range(len(sets)), key=sets.__getitem__)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank[inverse], [sets[i] for i in order]


def read_losses(path: str | Path) -> pa.Table:
    """The per-image loss table of Stage II: `target, sources, image_id, loss` (and optionally an
    integer `replicate`), with at least one row and a numeric `loss`."""
    table = read_table(path, LOSS_COLUMNS)
    if table.num_rows == 0:
        raise TaskatlasError(f"{path}: no rows (a header without per-image losses)")
    _check_loss_types(path, table.schema)
    return table


def _check_loss_types(path: str | Path, schema: pa.Schema) -> None:
    loss_type = schema.field("loss").type
    if not (pa.types.is_floating(loss_type) or pa.types.is_integer(loss_type)):
        raise TaskatlasError(f"{path}: column 'loss' must be numeric, not {loss_type}")
    if REPLICATE in schema.names and not pa.types.is_integer(schema.field(REPLICATE).type):
        raise TaskatlasError(
            f"{path}: column 'replicate' must be integers, not {schema.field(REPLICATE).type}"
        )


class LossFile:
    """A per-image loss file read one target at a time (Stage III on a file too big to hold whole).

    Parquet: the row groups holding each target are found from the `target` column alone, and a
    target's table is read from those row groups only (Stage II writes a target's rows together,
    so each target reads a few row groups and never the whole file). CSV has no row groups: it is
    read whole, once. Errors name the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._table: pa.Table | None = None
        self._file: pq.ParquetFile | None = None
        self._groups: dict[str, list[int]] = {}
        if self.path.suffix.lower() not in _PARQUET_SUFFIXES:
            self._table = read_losses(self.path)  # CSV (or an error naming the suffix)
            self.targets = factorize(self._table["target"], "target")[1]
            return
        if not self.path.is_file():
            raise TaskatlasError(f"{self.path}: no such file")
        try:
            paths = {column.path for column in pq.ParquetFile(self.path).schema}
            dictionary = [c for c in DICTIONARY_COLUMNS if c in paths]  # unknown ones: an error here
            self._file = pq.ParquetFile(self.path, read_dictionary=dictionary)
            schema = self._file.schema_arrow
            if missing := [c for c in LOSS_COLUMNS if c not in schema.names]:
                raise TaskatlasError(
                    f"{self.path}: missing column(s) {', '.join(missing)} (has {', '.join(schema.names)})"
                )
            _check_loss_types(self.path, schema)
            if self._file.metadata.num_rows == 0:
                raise TaskatlasError(f"{self.path}: no rows (a header without per-image losses)")
            for group in range(self._file.num_row_groups):
                column = self._file.read_row_group(group, columns=["target"])["target"]
                for name in factorize(column, "target")[1]:
                    self._groups.setdefault(name, []).append(group)
        except (pa.ArrowInvalid, OSError) as err:
            raise TaskatlasError(f"{self.path}: cannot read: {err}") from None
        self.targets: list[str] = sorted(self._groups)

    def read_target(self, target: str) -> pa.Table:
        """The rows of `target` (all columns), read from the row groups that hold it."""
        if self._file is None:
            table = self._table
        else:
            table = pa.concat_tables(self._file.read_row_group(g) for g in self._groups.get(target, []))
        return table.filter(pc.equal(table["target"], target))

    def image_ids(self) -> list[str]:
        """Every image id of the file, as text, sorted (the bootstrap's image axis), read from the
        `image_id` column alone."""
        if self._file is None:
            return sorted(str(v) for v in factorize(self._table["image_id"], "image_id")[1])
        ids: set[str] = set()
        for group in range(self._file.num_row_groups):
            column = self._file.read_row_group(group, columns=["image_id"])["image_id"]
            ids.update(str(v) for v in factorize(column, "image_id")[1])
        return sorted(ids)


def read_affinities(path: str | Path) -> TransferTable:
    """Our `affinity.parquet` or a released Taskonomy CSV, for the solver.

    The value is the `affinity` column (ours) or `value` (Taskonomy's); `order` is not read: it is
    the size of the source set.
    """
    table = read_table(path, ("target", "sources"))
    value_column = next((c for c in AFFINITY_VALUE_COLUMNS if c in table.column_names), None)
    if value_column is None:
        raise TaskatlasError(
            f"{path}: needs an 'affinity' or 'value' column (has {', '.join(table.column_names)})"
        )
    return transfer_table(table, value_column)


def transfer_table(table: pa.Table, value_column: str = "affinity") -> TransferTable:
    """An affinity table in memory (ours, or Taskonomy's with `value`) as the solver's input."""
    codes, sets = source_sets(table["sources"])
    target_codes, target_names = factorize(table["target"], "target")
    targets = [target_names[c] for c in target_codes]
    values = table[value_column].to_numpy(zero_copy_only=False).astype(float)
    return TransferTable.from_rows(zip(targets, (sets[c] for c in codes), values, strict=True))


def write_affinity(table: pa.Table, path: str | Path) -> None:
    """Parquet (sources as a list), or CSV by suffix (sources `+`-joined, as Taskonomy's files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in _PARQUET_SUFFIXES:
        pq.write_table(table, path)
    elif path.suffix.lower() == ".csv":
        joined = pc.binary_join(table["sources"], "+")
        flat = table.set_column(table.schema.get_field_index("sources"), "sources", joined)
        try:  # unquoted, like Taskonomy's files; a name with a comma or quote is refused
            pacsv.write_csv(flat, path, pacsv.WriteOptions(quoting_style="none"))
        except pa.ArrowInvalid as err:
            raise TaskatlasError(f"{path}: cannot write as CSV ({err}); use .parquet") from None
    else:
        raise TaskatlasError(f"{path}: expected a .parquet or .csv file")
