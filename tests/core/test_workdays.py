import datetime as dt

import chinese_calendar
import pytest

from citycard.core.workdays import (
    DayKind,
    HolidayTable,
    HolidayTableError,
    WorkdayCalendar,
    WorkdayResult,
    load_holiday_table,
)

D = dt.date
CITY = dt.timezone(dt.timedelta(hours=8))


@pytest.fixture
def calendar():
    return WorkdayCalendar()


def uncovered_warning(year: int) -> str:
    return (
        f"{year} is not covered by chinesecalendar {chinese_calendar.__version__}; assuming Monday to Friday"
    )


def write_table(tmp_path, text: str, name: str = "holidays.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- the official calendar -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("day", "is_workday"),
    [
        (D(2025, 9, 27), False),  # an ordinary Saturday
        (D(2025, 9, 28), True),  # Sunday, make-up working day for the National Day week
        (D(2025, 9, 30), True),
        (D(2025, 10, 1), False),  # National Day, a Wednesday
        (D(2025, 10, 8), False),  # the last day of the week off, a Wednesday
        (D(2025, 10, 11), True),  # Saturday, make-up working day
        (D(2025, 1, 26), True),  # Sunday, make-up working day for the Spring Festival
        (D(2025, 2, 4), False),  # Spring Festival, a Tuesday
    ],
)
def test_is_workday_follows_holidays_and_make_up_days(calendar, day, is_workday):
    assert calendar.is_workday(day) is is_workday


def test_phone_report_on_the_last_working_day_before_national_day_waits_out_the_week(calendar):
    # 10-01..10-08 off; 10-09 (Thursday) is working day 1, 10-10 (Friday) is working day 2.
    assert calendar.restore_deadline(D(2025, 9, 30)) == WorkdayResult(D(2025, 10, 10), ())


def test_report_during_the_holiday_counts_from_the_first_working_day(calendar):
    assert calendar.restore_deadline(D(2025, 10, 3)).date == D(2025, 10, 10)


def test_make_up_sunday_counts_as_a_working_day(calendar):
    # Friday report: Saturday 09-27 is off, Sunday 09-28 is a make-up working day (1), Monday (2).
    assert calendar.restore_deadline(D(2025, 9, 26)).date == D(2025, 9, 29)
    assert calendar.restore_deadline(D(2025, 9, 27)).date == D(2025, 9, 29)


def test_third_working_day_after_the_national_day_week_is_the_make_up_saturday(calendar):
    assert calendar.restore_deadline(D(2025, 9, 30), n_workdays=3).date == D(2025, 10, 11)


def test_spring_festival(calendar):
    # 2025-01-28..02-04 off: a Monday report is restored at the end of Thursday 02-06.
    assert calendar.restore_deadline(D(2025, 1, 27)).date == D(2025, 2, 6)
    # Friday 02-07: Saturday 02-08 is a make-up working day (1), Monday 02-10 (2).
    assert calendar.restore_deadline(D(2025, 2, 7)).date == D(2025, 2, 10)


def test_the_report_day_itself_never_counts(calendar):
    assert calendar.add_workdays(D(2025, 9, 29), 1).date == D(2025, 9, 30)


def test_an_instant_counts_by_its_date_in_the_city(calendar):
    # 17:00 UTC on Thursday 09-25 is 01:00 on Friday 09-26 in the city.
    report = dt.datetime(2025, 9, 25, 17, 0, tzinfo=dt.UTC)
    assert calendar.restore_deadline(report).date == D(2025, 9, 29)
    assert calendar.restore_deadline(report.astimezone(CITY).replace(tzinfo=None)).date == D(2025, 9, 29)


def test_end_instant_is_midnight_after_the_deadline_in_city_time(calendar):
    end = calendar.restore_deadline(D(2025, 9, 30)).end_instant()
    assert end == dt.datetime(2025, 10, 11, 0, 0, tzinfo=CITY)
    assert end.utcoffset() == dt.timedelta(hours=8)


@pytest.mark.parametrize("n", [0, -1, 367])
def test_working_day_count_out_of_range_is_refused(calendar, n):
    with pytest.raises(ValueError, match="n: "):
        calendar.add_workdays(D(2025, 9, 30), n)


# --- years the library does not cover -----------------------------------------------------------------


def test_uncovered_year_falls_back_to_monday_to_friday_with_a_warning(calendar):
    # 2099-01-01 is a Thursday: Friday 01-02 (1), Monday 01-05 (2); no New Year's Day is known.
    result = calendar.restore_deadline(D(2099, 1, 1))
    assert result.date == D(2099, 1, 5)
    assert result.warnings == (uncovered_warning(2099),)


def test_is_workday_in_an_uncovered_year_does_not_raise(calendar):
    assert calendar.is_workday(D(2099, 1, 2)) is True  # Friday
    assert calendar.is_workday(D(2099, 1, 3)) is False  # Saturday
    assert calendar.warnings_for(D(2099, 1, 3), D(2099, 1, 3)) == (uncovered_warning(2099),)


def test_warning_names_only_the_uncovered_years_a_result_rests_on(calendar):
    # 2003 precedes the library's data; 2004-01-01 is a holiday the library knows.
    result = calendar.restore_deadline(D(2003, 12, 30))
    assert result.date == D(2004, 1, 2)
    assert result.warnings == (uncovered_warning(2003),)


def test_warnings_for_a_covered_range_are_empty(calendar):
    assert calendar.warnings_for(D(2024, 12, 1), D(2025, 12, 31)) == ()


def test_a_table_that_leaves_no_working_day_ends_in_an_error_not_a_hang():
    all_off = {D(2090, 1, 1) + dt.timedelta(days=i): DayKind.HOLIDAY for i in range(4000)}
    calendar = WorkdayCalendar(HolidayTable(days=all_off, source="all-off.csv"))
    with pytest.raises(ValueError, match=r"all-off\.csv"):
        calendar.add_workdays(D(2090, 1, 1), 1)


# --- the operator's holiday table -----------------------------------------------------------------------


def test_operator_table_overrides_the_library(tmp_path):
    # A city adds a local holiday on 2025-10-09: the deadline moves to the make-up Saturday 10-11.
    table = load_holiday_table(write_table(tmp_path, "date,kind\n2025-10-09,holiday\n"))
    calendar = WorkdayCalendar(table)
    assert calendar.is_workday(D(2025, 10, 9)) is False
    assert calendar.restore_deadline(D(2025, 9, 30)) == WorkdayResult(D(2025, 10, 11), ())


def test_operator_table_covers_a_year_the_library_does_not(tmp_path):
    text = "\ufeffDate,Kind\n2099-01-02,holiday\n\n2099-01-03,WORKDAY\n"  # BOM, header case, blank line
    calendar = WorkdayCalendar(load_holiday_table(write_table(tmp_path, text)))
    result = calendar.restore_deadline(D(2099, 1, 1))
    assert result.date == D(2099, 1, 5)  # Friday 01-02 off, Saturday 01-03 (1), Monday 01-05 (2)
    assert result.warnings == ()


def test_an_empty_table_with_a_header_changes_nothing(tmp_path):
    calendar = WorkdayCalendar(load_holiday_table(write_table(tmp_path, "date,kind\n")))
    assert calendar.restore_deadline(D(2025, 9, 30)).date == D(2025, 10, 10)


@pytest.mark.parametrize(
    ("text", "row", "field"),
    [
        ("", 1, "header"),
        ("2025-10-09,holiday\n", 1, "header"),
        ("date,kind\n2025-10-09,holiday\n2025-13-01,holiday\n", 3, "date"),
        ("date,kind\n20251009,holiday\n", 2, "date"),
        ("date,kind\n,holiday\n", 2, "date"),
        ("date,kind\n2025-10-09,off\n", 2, "kind"),
        ("date,kind\n2025-10-09\n", 2, "row"),
        ("date,kind\n2025-10-09,holiday,Mid-Autumn\n", 2, "row"),
        ("date,kind\n2025-10-09,holiday\n2025-10-09,workday\n", 3, "date"),
    ],
)
def test_bad_table_rows_name_file_row_and_field(tmp_path, text, row, field):
    path = write_table(tmp_path, text)
    with pytest.raises(HolidayTableError) as caught:
        load_holiday_table(path)
    error = caught.value
    assert (error.path, error.row, error.field) == (str(path), row, field)
    assert f"{path}, row {row}, field {field}: " in str(error)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(HolidayTableError) as caught:
        load_holiday_table(tmp_path / "absent.csv")
    assert caught.value.field == "file"
    assert "absent.csv" in str(caught.value)


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "gbk.csv"
    path.write_bytes("date,kind\n2025-10-09,假日\n".encode("gbk"))
    with pytest.raises(HolidayTableError) as caught:
        load_holiday_table(path)
    assert caught.value.field == "file"
    assert "gbk.csv" in str(caught.value)
