"""The numbers in core/records.py and those compiled into the core agree; the facades' names are pinned."""

from citycard.core import _ledger, ledger, records


def test_compiled_constants_match_records():
    compiled = _ledger.constants()
    assert compiled["BATCH_EVENTS_MAX"] == records.BATCH_EVENTS_MAX
    for enum_name in ("AccountFlags", "TransferFlags", "ChangeAction", "AccountResult", "TransferResult",
                      "ChangeResult"):
        python_enum = getattr(records, enum_name)
        for name, value in compiled[enum_name].items():
            assert python_enum[name] == value, (enum_name, name)
    assert compiled["sizes"] == {"Account": records.ACCOUNT_DTYPE.itemsize, "Transfer": records.TRANSFER_DTYPE.itemsize,
                                 "Result": records.RESULT_DTYPE.itemsize, "Change": records.CHANGE_DTYPE.itemsize,
                                 "Movement": records.MOVEMENT_DTYPE.itemsize, "LogEvent": 32}


def test_result_codes_are_dense_and_ordered():
    for enum in (records.AccountResult, records.TransferResult, records.ChangeResult):
        assert [member.value for member in enum] == list(range(len(enum)))


def test_every_transfer_result_is_compiled_with_the_same_number():
    # The .pxd declares TR_<NAME> for each TransferResult; the generated C must carry them all.
    source = (__import__("pathlib").Path(_ledger.__file__).parent / "_ledger.pxd").read_text()
    for member in records.TransferResult:
        assert f"TR_{member.name} = {member.value}\n" in source, member
    for member in records.AccountResult:
        assert f"AR_{member.name} = {member.value}\n" in source, member
    for member in records.ChangeResult:
        assert f"CR_{member.name} = {member.value}\n" in source, member


def test_ledger_facade_exports():
    assert sorted(ledger.__all__) == sorted([
        "Ledger", "BatchResult", "Balance", "LedgerError", "LedgerInputError", "LedgerIOError", "CorruptionError",
        "MapFullError", "u128_words", "u128_value", "lmdb_version", "DEFAULT_MAP_SIZE_BYTES"])
    for name in ledger.__all__:
        assert hasattr(ledger, name), name
