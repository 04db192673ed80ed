import Foundation

/// A JSON value from an event payload or a preference condition.
public indirect enum JSONValue: Sendable, Equatable, Codable, Hashable {
    case string(String)
    case number(Double)
    case bool(Bool)
    case null
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            self = .null
        } else if let value = try? container.decode(Bool.self) {
            self = .bool(value)
        } else if let value = try? container.decode(Double.self) {
            self = .number(value)
        } else if let value = try? container.decode(String.self) {
            self = .string(value)
        } else if let value = try? container.decode([JSONValue].self) {
            self = .array(value)
        } else {
            self = .object(try container.decode([String: JSONValue].self))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .string(let v): try container.encode(v)
        case .number(let v): try container.encode(v)
        case .bool(let v): try container.encode(v)
        case .null: try container.encodeNil()
        case .array(let v): try container.encode(v)
        case .object(let v): try container.encode(v)
        }
    }

    /// The value at a dot-separated path (`visit.location.city`), if there is one.
    public func value(at path: String) -> JSONValue? {
        var current = self
        for key in path.split(separator: ".") {
            guard case .object(let object) = current, let next = object[String(key)] else { return nil }
            current = next
        }
        return current
    }

    /// A JSON number as templates print it: an `Int` while it is whole and an Int holds it, else
    /// the `Double` (`plain`, and `compactText`'s numbers).
    static func printed(_ number: Double) -> Any {
        number.rounded() == number && abs(number) < 9.2e18 ? Int(number) as Any : number as Any
    }

    /// A plain Swift value (for template rendering).
    public var plain: Any {
        switch self {
        case .string(let v): v
        // A whole number prints as one (`1234567890123456`, not `1234567890123456.0`) as far as
        // an Int holds it; JSON numbers are doubles here, so past 2^53 digits are already lost
        // (send such ids as strings).
        case .number(let v): Self.printed(v)
        case .bool(let v): v
        // Mustache renders NSNull as nothing and treats it as false in a section (a nil Optional
        // printed "nil").
        case .null: NSNull()
        // Printed as JSON by `{{name}}` (`TemplateList`, `TemplateObject`).
        case .array(let v): TemplateList(items: v.map(\.plain), json: self)
        case .object(let v): TemplateObject(fields: v.mapValues(\.plain), json: self)
        }
    }
}

/// What a condition looks at: the event (its payload and type) and its recipient (attributes,
/// time zone), at an instant: notify's, and again the digest's when a digest is sent.
public struct ConditionSubject: Sendable {
    public var payload: JSONValue
    /// The notification type key (`OUTING_PUBLISHED`).
    public var eventType: String?
    public var recipientAttributes: JSONValue
    public var timeZone: TimeZone
    /// `today` is the recipient's local date at this instant.
    public var now: Date

    public init(
        payload: JSONValue, eventType: String? = nil, recipientAttributes: JSONValue = .object([:]), timeZone: TimeZone,
        now: Date = Date()
    ) {
        self.payload = payload
        self.eventType = eventType
        self.recipientAttributes = recipientAttributes
        self.timeZone = timeZone
        self.now = now
    }

    /// The value a condition's field names: `event.type`, `recipient.attributes.<path>`,
    /// `payload.<path>`, or a bare `<path>` in the payload.
    func value(of field: String) -> JSONValue? {
        if field == "event.type" { return eventType.map(JSONValue.string) }
        if field.hasPrefix("recipient.attributes.") {
            return recipientAttributes.value(at: String(field.dropFirst("recipient.attributes.".count)))
        }
        if field.hasPrefix("payload.") { return payload.value(at: String(field.dropFirst("payload.".count))) }
        return payload.value(at: field)
    }

    /// The recipient's local date at `now`, as `YYYY-MM-DD`.
    var today: String {
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = timeZone
        let parts = calendar.dateComponents([.year, .month, .day], from: now)
        return String(format: "%04d-%02d-%02d", parts.year ?? 0, parts.month ?? 0, parts.day ?? 0)
    }
}

/// A condition a preference puts on events: "only outings of these activity types starting on
/// Saturday or Sunday" is two conditions, both of which must hold. A condition may also look at
/// the event's type and the recipient's attributes ("only new outings", "only while my licence
/// is valid"): see `ConditionSubject` and docs/engine.md.
public struct Condition: Sendable, Hashable, Codable {
    public enum Operator: String, Sendable, Codable, CaseIterable {
        /// The payload field equals `value`.
        case equals
        /// The payload field is one of `values`.
        case `in`
        /// The payload field is none of `values` (a missing field passes).
        case notIn = "not_in"
        /// The payload field is a date (or date-time) whose weekday is one of `values`
        /// (`monday` … `sunday`), in the recipient's time zone for date-times.
        case weekdayIn = "weekday_in"
        /// The field is at least `value`: numbers by value, date-times as instants, dates and
        /// other text in order; the value `"today"` is the recipient's local date, compared with
        /// the field's date. A missing field fails (see `compare`).
        case atLeast = "gte"
        /// The field is at most `value`, as `gte`.
        case atMost = "lte"
    }

    public var field: String
    public var op: Operator
    public var value: JSONValue?
    public var values: [JSONValue]?

    public init(field: String, op: Operator, value: JSONValue? = nil, values: [JSONValue]? = nil) {
        self.field = field
        self.op = op
        self.value = value
        self.values = values
    }

    enum CodingKeys: String, CodingKey { case field, op, value, values }

    /// `"value": null` is a value (`equals` null), not a missing one.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        field = try container.decode(String.self, forKey: .field)
        op = try container.decode(Operator.self, forKey: .op)
        value = container.contains(.value) ? try container.decode(JSONValue.self, forKey: .value) : nil
        values = try container.decodeIfPresent([JSONValue].self, forKey: .values)
    }

    /// The condition as explain shows it: `payload.activity in ["hike","ride"]`.
    public var summary: String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        func literal(_ value: JSONValue) -> String { (try? encoder.encode(value)).map { String(decoding: $0, as: UTF8.self) } ?? "?" }
        switch op {
        case .equals, .atLeast, .atMost: return "\(field) \(op.rawValue) \(literal(value ?? .null))"
        case .in, .notIn, .weekdayIn: return "\(field) \(op.rawValue) \(literal(.array(values ?? [])))"
        }
    }

    static let weekdays = ["sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"]

    /// Refuses a condition that can never be evaluated.
    public func validate(field name: String = "conditions") throws(ValidationError) {
        guard !field.isEmpty, field.count <= 200 else { throw ValidationError(field: name, message: "a condition needs a payload field.") }
        if field.hasPrefix("event."), field != "event.type" {
            throw ValidationError(
                field: name, message: "of the event, a condition can test \"event.type\" (other fields are in \"payload.\").")
        }
        if field == "recipient.attributes" || (field.hasPrefix("recipient.") && !field.hasPrefix("recipient.attributes.")) {
            throw ValidationError(field: name, message: "of the recipient, a condition can test \"recipient.attributes.<name>\".")
        }
        switch op {
        case .equals:
            guard value != nil else { throw ValidationError(field: name, message: "\"equals\" needs a value.") }
        case .atLeast, .atMost:
            switch value {
            case .number: break
            case .string(let text) where text == "today" || RFC3339.isFullDate(text) || RFC3339.date(from: text) != nil: break
            default:
                throw ValidationError(
                    field: name,
                    message:
                        "\"\(op.rawValue)\" needs a number, an ISO date such as \"2027-03-31\" (or an RFC 3339 date-time) or \"today\".")
            }
        case .in, .notIn:
            guard let values, !values.isEmpty else {
                throw ValidationError(field: name, message: "\"\(op.rawValue)\" needs a non-empty values list.")
            }
        case .weekdayIn:
            guard let values, !values.isEmpty,
                values.allSatisfy({ if case .string(let d) = $0 { Self.weekdays.contains(d.lowercased()) } else { false } })
            else {
                throw ValidationError(field: name, message: "\"weekday_in\" needs weekday names such as \"saturday\".")
            }
        }
    }

    /// Whether `payload` meets the condition for a recipient in `timeZone`.
    public func isMet(by payload: JSONValue, timeZone: TimeZone) -> Bool {
        isMet(by: ConditionSubject(payload: payload, timeZone: timeZone))
    }

    /// Whether the event and recipient of `subject` meet the condition.
    public func isMet(by subject: ConditionSubject) -> Bool {
        let actual = subject.value(of: field)
        let timeZone = subject.timeZone
        switch op {
        case .atLeast, .atMost:
            guard let actual, let order = Self.compare(actual, value, today: subject.today) else { return false }
            return op == .atLeast ? order != .orderedAscending : order != .orderedDescending
        case .equals:
            return actual != nil && actual == value
        case .in:
            guard let actual else { return false }
            return values?.contains(actual) ?? false
        case .notIn:
            guard let actual else { return true }
            return !(values?.contains(actual) ?? false)
        case .weekdayIn:
            guard case .string(let text) = actual, let weekday = Self.weekday(of: text, in: timeZone) else { return false }
            return values?.contains { if case .string(let day) = $0 { day.lowercased() == weekday } else { false } } ?? false
        }
    }

    /// How `actual` compares with `bound`: numbers by value; two RFC 3339 date-times as instants
    /// (`10:00:00+02:00` is before `09:30:00Z`); a date with a date-time by their dates as written
    /// (the first ten characters); other text in order (ISO dates sort as dates). `"today"`
    /// stands for the recipient's local date, compared with the field's date. Nil when they
    /// cannot be compared.
    static func compare(_ actual: JSONValue, _ bound: JSONValue?, today: String) -> ComparisonResult? {
        func order<T: Comparable>(_ a: T, _ b: T) -> ComparisonResult {
            a < b ? .orderedAscending : a > b ? .orderedDescending : .orderedSame
        }
        switch (actual, bound) {
        case (.number(let a), .number(let b)):
            return order(a, b)
        case (.string(let a), .string(let b)):
            if b == "today" { return order(String(a.prefix(10)), today) }
            let (instantA, instantB) = (RFC3339.date(from: a), RFC3339.date(from: b))
            if let instantA, let instantB { return order(instantA, instantB) }
            if (instantA != nil && RFC3339.isFullDate(b)) || (instantB != nil && RFC3339.isFullDate(a)) {
                return order(String(a.prefix(10)), String(b.prefix(10)))
            }
            return order(a, b)
        default:
            return nil
        }
    }

    /// `monday` … `sunday` for an ISO 8601 date (`2026-11-21`) or date-time.
    static func weekday(of text: String, in timeZone: TimeZone) -> String? {
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = timeZone
        if text.count == 10 {
            let parts = text.split(separator: "-").compactMap { Int($0) }
            guard parts.count == 3 else { return nil }
            calendar.timeZone = TimeZone(identifier: "UTC")!
            guard let date = calendar.date(from: DateComponents(year: parts[0], month: parts[1], day: parts[2])) else { return nil }
            return weekdays[calendar.component(.weekday, from: date) - 1]
        }
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        guard let date = formatter.date(from: text) ?? ISO8601DateFormatter().date(from: text) else { return nil }
        return weekdays[calendar.component(.weekday, from: date) - 1]
    }
}
