import Foundation
import Testing

@testable import HeraldCore

/// Job schedules (issue 11): five-field cron expressions in a time zone, checked at fixed
/// instants. 2026's transitions as in `DigestScheduleTests`: Paris springs forward on 29 March
/// (02:00 → 03:00 local) and falls back on 25 October (03:00 → 02:00); New York on 8 March and
/// 1 November.
@Suite("Cron expressions of scheduled jobs")
struct CronExpressionTests {
    let paris = TimeZone(identifier: "Europe/Paris")!
    let newYork = TimeZone(identifier: "America/New_York")!

    func at(_ text: String) -> Date { RFC3339.date(from: text)! }

    func cron(_ text: String) throws -> CronExpression { try CronExpression(text) }

    @Test("the retention job's 03:30 follows Paris's local clock across both transitions")
    func dailyAcrossDST() throws {
        let retention = try cron("30 3 * * *")
        #expect(retention.next(after: at("2026-03-28T12:00:00Z"), in: paris) == at("2026-03-29T01:30:00Z"))
        #expect(retention.next(after: at("2026-03-29T01:30:00Z"), in: paris) == at("2026-03-30T01:30:00Z"))
        #expect(retention.next(after: at("2026-10-24T12:00:00Z"), in: paris) == at("2026-10-25T02:30:00Z"))
        #expect(retention.next(after: at("2026-10-25T02:30:00Z"), in: paris) == at("2026-10-26T02:30:00Z"))
    }

    @Test("a time in the skipped hour runs at the transition; one in the repeated hour runs once")
    func transitions() throws {
        let early = try cron("30 2 * * *")
        // 02:30 does not exist in Paris on 29 March: 03:00 local (01:00 UTC).
        #expect(early.next(after: at("2026-03-28T12:00:00Z"), in: paris) == at("2026-03-29T01:00:00Z"))
        // It happens twice on 25 October: the first (00:30 UTC), then not again that day.
        #expect(early.next(after: at("2026-10-24T12:00:00Z"), in: paris) == at("2026-10-25T00:30:00Z"))
        #expect(early.next(after: at("2026-10-25T00:30:00Z"), in: paris) == at("2026-10-26T01:30:00Z"))
        // New York: 02:30 is skipped on 8 March (→ 03:00 EDT, 07:00 UTC), repeated on 1 November.
        #expect(early.next(after: at("2026-03-07T12:00:00Z"), in: newYork) == at("2026-03-08T07:00:00Z"))
        let quarter = try cron("*/15 1 * * *")
        // 01:00–01:45 on 1 November happen twice in New York; each runs once, in EDT.
        let first = quarter.next(after: at("2026-11-01T04:59:00Z"), in: newYork)
        #expect(first == at("2026-11-01T05:00:00Z"))
        #expect(quarter.next(after: at("2026-11-01T05:45:00Z"), in: newYork) == at("2026-11-02T06:00:00Z"))
    }

    @Test("steps, ranges, lists, weekdays, and crontab's either-day rule")
    func fields() throws {
        let utc = TimeZone.gmt
        #expect(try cron("*/15 * * * *").next(after: at("2026-12-02T10:07:00Z"), in: utc) == at("2026-12-02T10:15:00Z"))
        #expect(try cron("0 9 * * 1-5").next(after: at("2026-12-04T10:00:00Z"), in: utc) == at("2026-12-07T09:00:00Z"))
        #expect(try cron("0 9 * * 0").next(after: at("2026-12-02T10:00:00Z"), in: utc) == at("2026-12-06T09:00:00Z"))
        #expect(try cron("0 9 * * 7").weekdays == [7] && (try cron("0 9 * * 0").weekdays) == [7])
        #expect(try cron("0 0,12 * * *").next(after: at("2026-12-02T00:00:00Z"), in: utc) == at("2026-12-02T12:00:00Z"))
        // Day of month 15 OR Monday (both restricted): Monday 7 December comes first.
        #expect(try cron("0 0 15 * 1").next(after: at("2026-12-02T00:00:00Z"), in: utc) == at("2026-12-07T00:00:00Z"))
        #expect(try cron("0 0 1 1 *").next(after: at("2026-12-02T00:00:00Z"), in: utc) == at("2027-01-01T00:00:00Z"))
        #expect(try cron("5/20 * * * *").minutes == [5, 25, 45])
    }

    @Test("a malformed expression is refused, saying which field and why")
    func invalid() {
        for (text, said) in [
            ("30 3 * *", "five fields"), ("60 * * * *", "minute"), ("* 24 * * *", "hour"), ("* * 0 * *", "day of month"),
            ("* * * 13 *", "month"), ("* * * * 8", "day of week"), ("*/0 * * * *", "step"), ("5-1 * * * *", "minute"),
            ("@daily", "five fields"), ("* * * JAN *", "month"),
        ] {
            #expect(throws: CronExpression.Invalid.self) { try CronExpression(text) }
            var message = ""
            do { _ = try CronExpression(text) } catch { message = error.description }
            #expect(message.contains(said), "\(text): \(message)")
        }
    }
}
