import Foundation
import Testing

@testable import HeraldCore

/// Recurring schedules' rules (issue 11): the RRULE subset, checked at fixed instants.
@Suite("Recurrence rules (an RRULE subset) in a time zone")
struct RecurrenceTests {
    let paris = TimeZone(identifier: "Europe/Paris")!
    let newYork = TimeZone(identifier: "America/New_York")!
    let utc = TimeZone(identifier: "UTC")!

    func at(_ text: String) -> Date { RFC3339.date(from: text)! }

    func rule(_ text: String, from start: String, in zone: TimeZone) throws -> Recurrence {
        try Recurrence(rule: text, start: at(start), timeZone: zone)
    }

    @Test("weekly on Monday and Wednesday at 09:30 Paris time, across the spring transition; COUNT bounds it")
    func weekly() throws {
        // Monday 23 March, midnight in Paris.
        let reminders = try rule("FREQ=WEEKLY;BYDAY=MO,WE;BYHOUR=9;BYMINUTE=30", from: "2026-03-22T23:00:00Z", in: paris)
        #expect(
            reminders.occurrences(limit: 4) == [
                at("2026-03-23T08:30:00Z"), at("2026-03-25T08:30:00Z"), at("2026-03-30T07:30:00Z"), at("2026-04-01T07:30:00Z"),
            ])
        let three = try rule("RRULE:FREQ=WEEKLY;BYDAY=MO,WE;BYHOUR=9;BYMINUTE=30;COUNT=3", from: "2026-03-22T23:00:00Z", in: paris)
        #expect(three.occurrences(limit: 10).count == 3)
        // After the second, only the third is left: COUNT counts from the start.
        #expect(three.occurrences(after: at("2026-03-25T08:30:00Z"), limit: 10) == [at("2026-03-30T07:30:00Z")])
    }

    @Test("every other Tuesday at the start's local time (New York)")
    func interval() throws {
        let fortnightly = try rule("FREQ=WEEKLY;INTERVAL=2;BYDAY=TU", from: "2026-01-06T15:00:00Z", in: newYork)
        #expect(fortnightly.occurrences(limit: 3) == [at("2026-01-06T15:00:00Z"), at("2026-01-20T15:00:00Z"), at("2026-02-03T15:00:00Z")])
        // Without BYDAY, the start's weekday.
        let weekly = try rule("FREQ=WEEKLY", from: "2026-01-06T15:00:00Z", in: newYork)
        #expect(weekly.occurrences(limit: 2) == [at("2026-01-06T15:00:00Z"), at("2026-01-13T15:00:00Z")])
    }

    @Test("daily at two hours until an instant (UNTIL is inclusive, in either form)")
    func dailyUntil() throws {
        let expected = [
            at("2026-01-01T09:00:00Z"), at("2026-01-01T17:00:00Z"), at("2026-01-02T09:00:00Z"), at("2026-01-02T17:00:00Z"),
            at("2026-01-03T09:00:00Z"),
        ]
        let ical = try rule("FREQ=DAILY;BYHOUR=9,17;BYMINUTE=0;UNTIL=20260103T090000Z", from: "2026-01-01T00:00:00Z", in: utc)
        #expect(ical.occurrences(limit: 20) == expected)
        let rfc3339 = try rule("FREQ=DAILY;BYHOUR=17,9;BYMINUTE=0;UNTIL=2026-01-03T12:00:00Z", from: "2026-01-01T00:00:00Z", in: utc)
        #expect(rfc3339.occurrences(limit: 20) == expected)
    }

    @Test("monthly: the 31st only in months that have one, every Friday, or the start's day")
    func monthly() throws {
        let lastDay = try rule("FREQ=MONTHLY;BYMONTHDAY=31;BYHOUR=12;BYMINUTE=0", from: "2026-01-01T00:00:00Z", in: utc)
        #expect(
            lastDay.occurrences(limit: 4) == [
                at("2026-01-31T12:00:00Z"), at("2026-03-31T12:00:00Z"), at("2026-05-31T12:00:00Z"), at("2026-07-31T12:00:00Z"),
            ])
        let fridays = try rule("FREQ=MONTHLY;BYDAY=FR;BYHOUR=8;BYMINUTE=0", from: "2026-05-01T00:00:00Z", in: utc)
        #expect(
            fridays.occurrences(limit: 6) == [
                at("2026-05-01T08:00:00Z"), at("2026-05-08T08:00:00Z"), at("2026-05-15T08:00:00Z"), at("2026-05-22T08:00:00Z"),
                at("2026-05-29T08:00:00Z"), at("2026-06-05T08:00:00Z"),
            ])
        // The last day of each month (-1 counts from the end, RFC 5545), and the second to last.
        let last = try rule("FREQ=MONTHLY;BYMONTHDAY=-1;BYHOUR=18;BYMINUTE=0", from: "2026-01-01T00:00:00Z", in: utc)
        #expect(
            last.occurrences(limit: 4) == [
                at("2026-01-31T18:00:00Z"), at("2026-02-28T18:00:00Z"), at("2026-03-31T18:00:00Z"), at("2026-04-30T18:00:00Z"),
            ])
        let secondToLast = try rule("FREQ=DAILY;BYMONTHDAY=-2;BYHOUR=9;BYMINUTE=0", from: "2028-02-01T00:00:00Z", in: utc)
        #expect(secondToLast.occurrences(limit: 2) == [at("2028-02-28T09:00:00Z"), at("2028-03-30T09:00:00Z")])
        // BYHOUR without BYMINUTE is on the hour, whatever minute the start has; with neither,
        // the start's hour and minute.
        let onTheHour = try rule("FREQ=MONTHLY;BYMONTHDAY=1;BYHOUR=17", from: "2026-01-01T09:45:00Z", in: utc)
        #expect(onTheHour.occurrences(limit: 2) == [at("2026-01-01T17:00:00Z"), at("2026-02-01T17:00:00Z")])
        let asStarted = try rule("FREQ=DAILY", from: "2026-01-01T09:45:00Z", in: utc)
        #expect(asStarted.occurrences(limit: 1) == [at("2026-01-01T09:45:00Z")])
        let fifteenth = try rule("FREQ=MONTHLY", from: "2026-01-15T09:00:00Z", in: utc)
        #expect(fifteenth.occurrences(limit: 3) == [at("2026-01-15T09:00:00Z"), at("2026-02-15T09:00:00Z"), at("2026-03-15T09:00:00Z")])
    }

    @Test("02:30 every day in Paris: 03:00 on the night it is skipped, once on the night it repeats")
    func daylightSaving() throws {
        let spring = try rule("FREQ=DAILY;BYHOUR=2;BYMINUTE=30", from: "2026-03-28T00:00:00Z", in: paris)
        #expect(spring.occurrences(limit: 3) == [at("2026-03-28T01:30:00Z"), at("2026-03-29T01:00:00Z"), at("2026-03-30T00:30:00Z")])
        let autumn = try rule("FREQ=DAILY;BYHOUR=2;BYMINUTE=30", from: "2026-10-24T00:00:00Z", in: paris)
        #expect(autumn.occurrences(limit: 3) == [at("2026-10-24T00:30:00Z"), at("2026-10-25T00:30:00Z"), at("2026-10-26T01:30:00Z")])
    }

    @Test("what the subset does not support is refused by name")
    func refused() {
        let start = at("2026-01-01T00:00:00Z")
        func reason(_ text: String) -> String? {
            do {
                _ = try Recurrence(rule: text, start: start, timeZone: utc)
                return nil
            } catch {
                return error.description
            }
        }
        #expect(reason("FREQ=HOURLY")?.contains("FREQ=HOURLY is not supported") == true)
        #expect(reason("BYDAY=MO")?.contains("FREQ is required") == true)
        #expect(reason("FREQ=MONTHLY;BYDAY=1MO")?.contains("no ordinals") == true)
        #expect(reason("FREQ=MONTHLY;BYSETPOS=-1")?.contains("BYSETPOS is not supported") == true)
        #expect(reason("FREQ=DAILY;COUNT=3;UNTIL=20260105T000000Z")?.contains("COUNT and UNTIL") == true)
        #expect(reason("FREQ=WEEKLY;BYMONTHDAY=1")?.contains("BYMONTHDAY cannot be used with FREQ=WEEKLY") == true)
        #expect(reason("FREQ=DAILY;INTERVAL=0")?.contains("INTERVAL takes numbers from 1") == true)
        #expect(reason("FREQ=MONTHLY;BYMONTHDAY=0")?.contains("-1 (the month's last day)") == true)
        #expect(reason("FREQ=MONTHLY;BYMONTHDAY=-32")?.contains("'-32'") == true)
        #expect(reason("FREQ=DAILY;BYHOUR=24")?.contains("'24'") == true)
        #expect(reason("FREQ=DAILY;FREQ=WEEKLY")?.contains("given twice") == true)
        #expect(reason("FREQ=DAILY;UNTIL=tomorrow")?.contains("UNTIL must be") == true)
        #expect(reason("FREQ=DAILY;BYHOUR=9;BYMINUTE=15") == nil)
    }
}
