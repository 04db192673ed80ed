import Foundation

/// RFC 3339 `date-time` as `openapi.yaml` declares it (`format: date-time`), parsed by hand:
/// Foundation's ISO 8601 parsers refuse offsets beyond ±18:00 and lower-case `t`/`z`, which
/// RFC 3339 allows, so schema-valid requests were answered 400 (issue 8 item 10).
public enum RFC3339 {
    /// The instant `text` names, or nil if it is not `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`
    /// with a real calendar date (leap second `:60` is accepted and counted as the next second).
    public static func date(from text: String) -> Date? {
        let s = Array(text.utf8)
        guard s.count >= 20 else { return nil }
        func digits(_ at: Int, _ count: Int) -> Int? {
            guard at + count <= s.count else { return nil }
            var value = 0
            for byte in s[at..<(at + count)] {
                guard (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) else { return nil }
                value = value * 10 + Int(byte - UInt8(ascii: "0"))
            }
            return value
        }
        func byte(_ at: Int, _ allowed: String) -> Bool { at < s.count && allowed.utf8.contains(s[at]) }
        guard let year = digits(0, 4), byte(4, "-"), let month = digits(5, 2), byte(7, "-"), let day = digits(8, 2),
            byte(10, "Tt"), let hour = digits(11, 2), byte(13, ":"), let minute = digits(14, 2), byte(16, ":"),
            let second = digits(17, 2)
        else { return nil }
        guard (1...12).contains(month), (1...daysIn(month, of: year)).contains(day), hour <= 23, minute <= 59, second <= 60
        else { return nil }
        var at = 19
        var fraction = 0.0
        if byte(at, ".") {
            var scale = 0.1
            at += 1
            let start = at
            while at < s.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(s[at]) {
                fraction += Double(s[at] - UInt8(ascii: "0")) * scale
                scale /= 10
                at += 1
            }
            guard at > start else { return nil }
        }
        var offset = 0
        if byte(at, "Zz") {
            at += 1
        } else if byte(at, "+-"), let oh = digits(at + 1, 2), byte(at + 3, ":"), let om = digits(at + 4, 2), oh <= 23, om <= 59 {
            offset = (oh * 3600 + om * 60) * (s[at] == UInt8(ascii: "-") ? -1 : 1)
            at += 6
        } else {
            return nil
        }
        guard at == s.count else { return nil }
        let seconds = daysFromCivil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset
        return Date(timeIntervalSince1970: Double(seconds) + fraction)
    }

    private static func daysIn(_ month: Int, of year: Int) -> Int {
        switch month {
        case 2: (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 ? 29 : 28
        case 4, 6, 9, 11: 30
        default: 31
        }
    }

    /// Days since 1970-01-01 in the proleptic Gregorian calendar (Howard Hinnant's algorithm).
    private static func daysFromCivil(_ year: Int, _ month: Int, _ day: Int) -> Int {
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yearOfEra = y - era * 400
        let dayOfYear = (153 * (month > 2 ? month - 3 : month + 9) + 2) / 5 + day - 1
        let dayOfEra = yearOfEra * 365 + yearOfEra / 4 - yearOfEra / 100 + dayOfYear
        return era * 146_097 + dayOfEra - 719_468
    }
}
