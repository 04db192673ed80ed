import Foundation
import Testing

@testable import HeraldCore

/// Digest slots in the recipient's own time zone (issue 11), checked at fixed instants: no
/// clock, no sleeping. 2026's transitions: Europe/Paris springs forward on 29 March (02:00 →
/// 03:00 local, at 01:00 UTC) and falls back on 25 October (03:00 → 02:00 local, at 01:00 UTC);
/// America/New_York on 8 March (02:00 → 03:00, at 07:00 UTC) and 1 November (02:00 → 01:00, at
/// 06:00 UTC).
@Suite("Digest slots in the recipient's time zone")
struct DigestScheduleTests {
    let paris = TimeZone(identifier: "Europe/Paris")!
    let newYork = TimeZone(identifier: "America/New_York")!

    func at(_ text: String) -> Date { RFC3339.date(from: text)! }

    func schedule(_ cadence: DigestSchedule.Cadence, _ hour: Int, _ minute: Int = 0, in zone: TimeZone) -> DigestSchedule {
        DigestSchedule(cadence: cadence, hour: hour, minute: minute, timeZone: zone)!
    }

    @Test("a daily 08:00 follows the local clock across both of Paris's transitions")
    func dailyAcrossDST() {
        let daily = schedule(.daily, 8, in: paris)
        // Winter (UTC+1), then summer (UTC+2) from 29 March, then winter again from 25 October.
        #expect(daily.slot(after: at("2026-03-27T12:00:00Z")) == at("2026-03-28T07:00:00Z"))
        #expect(daily.slot(after: at("2026-03-28T07:00:00Z")) == at("2026-03-29T06:00:00Z"))
        #expect(daily.slot(after: at("2026-10-24T06:00:00Z")) == at("2026-10-25T07:00:00Z"))
        // Exactly at a slot: that slot is due, the next is tomorrow's.
        #expect(daily.slot(atOrBefore: at("2026-03-29T06:00:00Z")) == at("2026-03-29T06:00:00Z"))
        #expect(daily.slot(atOrBefore: at("2026-03-29T05:59:59Z")) == at("2026-03-28T07:00:00Z"))
    }

    @Test("a slot in the skipped hour moves to the next minute that exists (Paris and New York)")
    func skippedHour() {
        // 02:30 does not exist in Paris on 29 March: the slot is 03:00 local, the transition.
        let paris0230 = schedule(.daily, 2, 30, in: paris)
        #expect(paris0230.slot(after: at("2026-03-28T12:00:00Z")) == at("2026-03-29T01:00:00Z"))
        #expect(paris0230.slot(after: at("2026-03-29T01:00:00Z")) == at("2026-03-30T00:30:00Z"))
        // 02:00 itself is skipped too; 01:59 is not.
        #expect(schedule(.daily, 2, in: paris).slot(after: at("2026-03-28T12:00:00Z")) == at("2026-03-29T01:00:00Z"))
        #expect(schedule(.daily, 1, 59, in: paris).slot(after: at("2026-03-28T12:00:00Z")) == at("2026-03-29T00:59:00Z"))
        // New York, 8 March: 02:15 EST does not exist; 03:00 EDT is 07:00 UTC.
        let newYork0215 = schedule(.daily, 2, 15, in: newYork)
        #expect(newYork0215.slot(after: at("2026-03-07T12:00:00Z")) == at("2026-03-08T07:00:00Z"))
    }

    @Test("a slot in the repeated hour fires once, at the first of the two")
    func repeatedHour() {
        // 02:30 happens twice in Paris on 25 October: 00:30 UTC (summer time) and 01:30 UTC.
        let paris0230 = schedule(.daily, 2, 30, in: paris)
        let first = paris0230.slot(after: at("2026-10-24T12:00:00Z"))
        #expect(first == at("2026-10-25T00:30:00Z"))
        // The next slot is the next day's, not the second 02:30.
        #expect(paris0230.slot(after: first) == at("2026-10-26T01:30:00Z"))
        // During the second 02:30, the due slot is still the first one (no second run).
        #expect(paris0230.slot(atOrBefore: at("2026-10-25T01:45:00Z")) == first)
        // New York, 1 November: 01:30 happens at 05:30 UTC (EDT) and 06:30 UTC (EST).
        let newYork0130 = schedule(.daily, 1, 30, in: newYork)
        let once = newYork0130.slot(after: at("2026-10-31T12:00:00Z"))
        #expect(once == at("2026-11-01T05:30:00Z"))
        #expect(newYork0130.slot(after: once) == at("2026-11-02T06:30:00Z"))
    }

    @Test("a weekly slot is on the chosen weekday at the chosen local time, in every zone")
    func weekly() {
        // Monday 08:00 in Paris: 2026-03-23 is a Monday (winter), 2026-03-30 too (summer).
        let monday = schedule(.weekly(weekday: 1), 8, in: paris)
        #expect(monday.slot(after: at("2026-03-23T07:00:00Z")) == at("2026-03-30T06:00:00Z"))
        #expect(monday.slot(after: at("2026-03-20T12:00:00Z")) == at("2026-03-23T07:00:00Z"))
        #expect(monday.slot(atOrBefore: at("2026-03-29T23:00:00Z")) == at("2026-03-23T07:00:00Z"))
        // A user's own hour and weekday: Sunday 18:30 in New York.
        let sunday = schedule(.weekly(weekday: 7), 18, 30, in: newYork)
        #expect(sunday.slot(after: at("2026-11-01T00:00:00Z")) == at("2026-11-01T23:30:00Z"))
        #expect(sunday.slot(after: at("2026-11-01T23:30:00Z")) == at("2026-11-08T23:30:00Z"))
    }

    @Test("the same instant is a different local day in different zones")
    func perZone() {
        let instant = at("2026-06-15T05:00:00Z")
        #expect(schedule(.daily, 8, in: paris).slot(after: instant) == at("2026-06-15T06:00:00Z"))
        #expect(schedule(.daily, 8, in: newYork).slot(after: instant) == at("2026-06-15T12:00:00Z"))
        #expect(schedule(.daily, 8, in: TimeZone(identifier: "Asia/Tokyo")!).slot(after: instant) == at("2026-06-15T23:00:00Z"))
    }

    @Test("hours, minutes and weekdays out of range are refused")
    func ranges() {
        #expect(DigestSchedule(cadence: .daily, hour: 24, timeZone: paris) == nil)
        #expect(DigestSchedule(cadence: .daily, hour: 8, minute: 60, timeZone: paris) == nil)
        #expect(DigestSchedule(cadence: .weekly(weekday: 0), hour: 8, timeZone: paris) == nil)
        #expect(DigestSchedule(cadence: .weekly(weekday: 8), hour: 8, timeZone: paris) == nil)
    }
}
