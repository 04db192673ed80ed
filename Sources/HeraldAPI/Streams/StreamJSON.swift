import Foundation
import HeraldCore
import HeraldStore

/// The JSON of the two events a fan-out writes to every stream (`notification.created`'s feed
/// item and `unread_count`), written by hand: `JSONEncoder` was half of a stream's work in a
/// fan-out (`perf`, issue 10's benchmark). The bytes are the encoder's (sorted keys, unescaped
/// slashes, RFC 3339 dates without fractions), which `StreamJSONTests` checks item by item
/// against `FeedStreamSession.json`.
enum StreamJSON {
    static func feedItem(_ item: FeedItem) -> String {
        var out = "{\"archived\":"
        out.reserveCapacity(256 + item.title.utf8.count + item.body.utf8.count)
        out += item.archived ? "true" : "false"
        out += ",\"body\":"
        string(item.body, into: &out)
        out += ",\"category\":"
        string(item.categoryKey, into: &out)
        out += ",\"created_at\":\""
        out += timestamp(item.createdAt)
        out += "\",\"event_id\":\""
        out += item.eventID.uuidString.lowercased()
        out += "\""
        if let expires = item.expiresAt {
            out += ",\"expires_at\":\""
            out += timestamp(expires)
            out += "\""
        }
        out += ",\"id\":\""
        out += item.id.uuidString.lowercased()
        out += "\",\"priority\":"
        string(item.priority.rawValue, into: &out)
        out += ",\"read\":"
        out += item.read ? "true" : "false"
        out += ",\"severity\":"
        string(item.severity.rawValue, into: &out)
        if let type = item.subjectType {
            out += ",\"subject\":{\"id\":"
            string(item.subjectID ?? "", into: &out)
            out += ",\"type\":"
            string(type, into: &out)
            out += "}"
        }
        if !item.tags.isEmpty {
            out += ",\"tags\":["
            for (index, tag) in item.tags.enumerated() {
                if index > 0 { out += "," }
                string(tag, into: &out)
            }
            out += "]"
        }
        out += ",\"title\":"
        string(item.title, into: &out)
        out += ",\"type\":"
        string(item.typeKey, into: &out)
        out += "}"
        return out
    }

    static func unreadCount(_ count: UnreadCount) -> String {
        var out = "{\"by_category\":{"
        for (index, key) in count.byCategory.keys.sorted().enumerated() {
            if index > 0 { out += "," }
            string(key, into: &out)
            out += ":\(count.byCategory[key] ?? 0)"
        }
        out += "},\"total\":\(count.total)}"
        return out
    }

    /// A JSON string as the encoder writes it: quote, backslash and control characters escaped,
    /// everything else (slashes, non-ASCII) as it is.
    static func string(_ value: String, into out: inout String) {
        out += "\""
        var plain = true
        for unit in value.utf8 where unit < 0x20 || unit == 0x22 || unit == 0x5C {
            plain = false
            break
        }
        if plain {
            out += value
        } else {
            for scalar in value.unicodeScalars {
                switch scalar {
                case "\"": out += "\\\""
                case "\\": out += "\\\\"
                case "\n": out += "\\n"
                case "\r": out += "\\r"
                case "\t": out += "\\t"
                case "\u{08}": out += "\\b"
                case "\u{0C}": out += "\\f"
                case _ where scalar.value < 0x20:
                    let hex = String(scalar.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                default: out.unicodeScalars.append(scalar)
                }
            }
        }
        out += "\""
    }

    /// `2026-11-21T10:00:00Z`: whole seconds (the fraction dropped), UTC.
    static func timestamp(_ date: Date) -> String {
        let seconds = Int((date.timeIntervalSince1970).rounded(.down))
        let (days, secondOfDay) = seconds.quotientAndRemainder(dividingBy: 86_400)
        let day = secondOfDay < 0 ? days - 1 : days
        let second = secondOfDay < 0 ? secondOfDay + 86_400 : secondOfDay
        // Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's civil_from_days).
        let z = day + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let dayOfEra = z - era * 146_097
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let monthIndex = (5 * dayOfYear + 2) / 153
        let dayOfMonth = dayOfYear - (153 * monthIndex + 2) / 5 + 1
        let month = monthIndex < 10 ? monthIndex + 3 : monthIndex - 9
        let year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0)
        func two(_ value: Int) -> String { value < 10 ? "0\(value)" : "\(value)" }
        let yearText = year < 1000 ? String(repeating: "0", count: 4 - String(year).count) + String(year) : String(year)
        return "\(yearText)-\(two(month))-\(two(dayOfMonth))T\(two(second / 3600)):\(two(second % 3600 / 60)):\(two(second % 60))Z"
    }
}
