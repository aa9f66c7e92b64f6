import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from citycard.core.identity import (
    CitizenId,
    Gender,
    IdentityError,
    UnitCode,
    check_character,
    mask_id,
    unit_check_character,
    validate_citizen_id,
    validate_name,
    validate_unit_code,
)

TODAY = dt.date(2025, 6, 1)
# The example of GB 11643-1999 itself: Beijing Chaoyang, born 1949-12-31, sequence 002 (female).
STANDARD_EXAMPLE = "11010519491231002X"

# Written out rather than derived, so the tests do not share the module's arithmetic.
ID_WEIGHTS = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
ID_CHECK_BY_REMAINDER = ["1", "0", "X", "9", "8", "7", "6", "5", "4", "3", "2"]
PROVINCES = [
    "11", "12", "13", "14", "15", "21", "22", "23", "31", "32", "33", "34", "35", "36", "37",
    "41", "42", "43", "44", "45", "46", "50", "51", "52", "53", "54", "61", "62", "63", "64", "65",
    "71", "81", "82", "83",
]  # fmt: skip


def make_id(region: str = "370102", birth: str = "19800501", sequence: str = "123") -> str:
    body = region + birth + sequence
    remainder = sum(int(d) * w for d, w in zip(body, ID_WEIGHTS, strict=True)) % 11
    return body + ID_CHECK_BY_REMAINDER[remainder]


def error_of(text: str, **kwargs) -> IdentityError:
    with pytest.raises(IdentityError) as caught:
        validate_citizen_id(text, today=TODAY, **kwargs)
    return caught.value


# --- citizen ID: accepted -------------------------------------------------------------------------


def test_standard_example_is_valid_and_read_into_its_parts():
    citizen = validate_citizen_id(STANDARD_EXAMPLE, today=TODAY)
    assert citizen == CitizenId(
        number=STANDARD_EXAMPLE, region="110105", birth_date=dt.date(1949, 12, 31), gender=Gender.FEMALE
    )
    assert citizen.province == "11"


def test_lower_case_x_and_surrounding_spaces_are_normalised():
    assert validate_citizen_id(" 11010519491231002x\n", today=TODAY).number == STANDARD_EXAMPLE


def test_odd_sequence_is_male_even_is_female():
    assert validate_citizen_id(make_id(sequence="123"), today=TODAY).gender is Gender.MALE
    assert validate_citizen_id(make_id(sequence="124"), today=TODAY).gender is Gender.FEMALE


@pytest.mark.parametrize("province", PROVINCES)
def test_every_province_level_code_is_accepted(province):
    assert validate_citizen_id(make_id(region=province + "0102"), today=TODAY).region == province + "0102"


def test_birth_today_and_on_1900_01_01_are_accepted():
    assert validate_citizen_id(make_id(birth="20250601"), today=TODAY).birth_date == TODAY
    assert validate_citizen_id(make_id(birth="19000101"), today=TODAY).birth_date == dt.date(1900, 1, 1)


def test_declared_date_of_birth_and_gender_that_match_are_accepted():
    citizen = validate_citizen_id(
        make_id(sequence="123"), date_of_birth=dt.date(1980, 5, 1), gender="male", today=TODAY
    )
    assert citizen.gender is Gender.MALE


def test_repr_and_str_show_the_number_masked():
    citizen = validate_citizen_id(STANDARD_EXAMPLE, today=TODAY)
    assert STANDARD_EXAMPLE not in repr(citizen)
    assert "1949" not in repr(citizen)
    assert str(citizen) == "110105********002X" == citizen.masked


def test_today_defaults_to_the_pinned_clock(monkeypatch):
    monkeypatch.setenv("CITYCARD_NOW", "2000-01-01T12:00:00")
    with pytest.raises(IdentityError) as caught:
        validate_citizen_id(make_id(birth="20050101"))
    assert caught.value.field == "birth_date"
    assert "2000-01-01" in caught.value.reason


# --- citizen ID: refused, each naming the field ----------------------------------------------------

REFUSALS = [
    ("length", make_id()[:-1], {}),
    ("length", make_id() + "1", {}),
    ("length", "", {}),
    ("characters", make_id()[:5] + "A" + make_id()[6:], {}),
    ("characters", make_id()[:-1] + "Y", {}),
    ("characters", "\uff11" + make_id()[1:], {}),  # a full-width digit one
    ("region", make_id(region="070102"), {}),
    ("region", make_id(region="910102"), {}),
    ("region", make_id(region="190102"), {}),  # starts 1-8, but 19 is no province
    ("birth_date", make_id(birth="19800230"), {}),
    ("birth_date", make_id(birth="19801301"), {}),
    ("birth_date", make_id(birth="18991231"), {}),
    ("birth_date", make_id(birth="20250602"), {}),  # the day after TODAY
    ("check_character", make_id()[:-1] + ("0" if make_id()[-1] != "0" else "1"), {}),
    ("date_of_birth", make_id(), {"date_of_birth": dt.date(1980, 5, 2)}),
    ("gender", make_id(sequence="123"), {"gender": Gender.FEMALE}),
    ("gender", make_id(sequence="123"), {"gender": "unknown"}),
]


@pytest.mark.parametrize(("field", "text", "kwargs"), REFUSALS)
def test_refusal_names_the_field(field, text, kwargs):
    assert error_of(text, **kwargs).field == field


@pytest.mark.parametrize(("field", "text", "kwargs"), REFUSALS)
def test_refusal_message_shows_the_number_only_masked(field, text, kwargs):
    message = str(error_of(text, **kwargs))
    assert field in message
    if len(text) >= 11:
        assert text not in message
        assert text[6:-4] not in message  # the birth date and sequence stay hidden
        assert mask_id(text.strip()) in message


def test_region_is_checked_before_the_check_character():
    bad_region_and_check = "910102" + make_id()[6:-1] + ("0" if make_id()[-1] != "0" else "1")
    assert error_of(bad_region_and_check).field == "region"


def test_character_error_says_which_position():
    assert "character 6" in error_of(make_id()[:5] + "A" + make_id()[6:]).reason


def test_non_str_is_a_type_error():
    with pytest.raises(TypeError):
        validate_citizen_id(110105194912310020)  # type: ignore[arg-type]


# --- check character -------------------------------------------------------------------------------


def test_check_character_of_the_standard_example():
    assert check_character(STANDARD_EXAMPLE[:17]) == "X"
    assert check_character("44052418800101001") == "4"  # the standard's second example (born 1880)


@given(st.text(alphabet="0123456789", min_size=17, max_size=17))
def test_check_character_makes_the_weighted_sum_one_modulo_eleven(first17):
    # ISO 7064 MOD 11-2: with the check character worth 10 for X, sum(a_i * 2**(i-1)) mod 11 == 1,
    # i counted from the right starting at 1.
    number = first17 + check_character(first17)
    values = [10 if char == "X" else int(char) for char in number]
    assert sum(value * 2 ** (18 - index) for index, value in enumerate(values, start=1)) % 11 == 1


@pytest.mark.parametrize("bad", ["1101051949123100", "110105194912310020", "1101051949123100A"])
def test_check_character_needs_seventeen_digits(bad):
    with pytest.raises(IdentityError) as caught:
        check_character(bad)
    assert caught.value.field == "characters"


# --- masking -----------------------------------------------------------------------------------------


def test_mask_keeps_first_six_and_last_four_of_an_id():
    assert mask_id(STANDARD_EXAMPLE) == "110105********002X"
    assert mask_id("1101051949123100211") == "110105*********0211"


@pytest.mark.parametrize(
    ("text", "masked"), [("", ""), ("a", "*"), ("abc", "***"), ("abcd", "a**d"), ("1234567890", "12******90")]
)
def test_mask_of_a_short_text_never_shows_it_whole(text, masked):
    assert mask_id(text) == masked


@given(st.text(alphabet=st.characters(blacklist_characters="*"), min_size=1, max_size=17))
def test_mask_of_a_short_text_hides_at_least_half(text):
    masked = mask_id(text)
    assert len(masked) == len(text)
    assert masked.count("*") * 2 >= len(text)


# --- names -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("张三", "张三"),
        ("  李四 ", "李四"),
        ("阿卜杜拉·热合曼", "阿卜杜拉·热合曼"),
        ("阿卜杜拉•热合曼", "阿卜杜拉·热合曼"),  # bullet read as the middle dot
        ("阿卜杜拉・热合曼", "阿卜杜拉·热合曼"),  # katakana middle dot likewise
        ("John Smith", "John Smith"),
        ("欧阳" * 15, "欧阳" * 15),  # exactly 30 characters
    ],
)
def test_names_accepted(text, name):
    assert validate_name(text) == name


@pytest.mark.parametrize(
    ("text", "reason_part"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("欧阳" * 15 + "修", "31 characters"),
        ("张\x07三", "character 2 (U+0007) is a control character"),
        ("张\u200d三", "character 2 (U+200D) is a control character"),
        ("张😀", "character 2 (U+1F600) cannot be written in GBK"),
        ("·热合曼", "middle dot"),
        ("热合曼·", "middle dot"),
        ("阿卜杜拉··热合曼", "middle dot"),
    ],
)
def test_names_refused(text, reason_part):
    with pytest.raises(IdentityError) as caught:
        validate_name(text)
    assert caught.value.field == "name"
    assert reason_part in caught.value.reason


# --- unit codes ----------------------------------------------------------------------------------------

UNIT_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
# Codes published on business licences.
REAL_UNIT_CODES = ["914403001922038216", "9144030071526726XG", "91350100M000100Y43", "91110000802100433B"]


@pytest.mark.parametrize("code", REAL_UNIT_CODES)
def test_published_unit_codes_are_valid(code):
    assert validate_unit_code(code).code == code


def test_unit_code_is_read_into_its_parts_and_upper_cased():
    assert validate_unit_code(" 9144030071526726xg ") == UnitCode(
        code="9144030071526726XG", registration_authority="9", institution_type="1", region="440300"
    )


@given(st.text(alphabet=UNIT_ALPHABET, min_size=17, max_size=17))
def test_unit_check_character_makes_the_weighted_sum_zero_modulo_31(first17):
    code = first17 + unit_check_character(first17)
    weights = [3**i % 31 for i in range(17)] + [1]
    assert sum(UNIT_ALPHABET.index(char) * w for char, w in zip(code, weights, strict=True)) % 31 == 0


@pytest.mark.parametrize(
    ("text", "reason_part"),
    [
        ("914403001922038217", "check character"),
        ("91440300192203821", "17 characters"),
        ("440301103097413", "15 characters"),  # an old business registration number
        ("12345678-9", "10 characters"),  # an old organisation code
        ("91440300O922038216", "character 9 ('O')"),
        ("91A403001922038216", "region code A40300"),
    ],
)
def test_unit_codes_refused(text, reason_part):
    with pytest.raises(IdentityError) as caught:
        validate_unit_code(text)
    assert caught.value.field == "unit_code"
    assert reason_part in caught.value.reason
