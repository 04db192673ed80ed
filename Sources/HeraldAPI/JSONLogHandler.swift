import Foundation
import Logging

/// One JSON object per line on standard error: time, level, label, message and metadata.
/// Production log format (`HERALD_LOG_FORMAT=json`).
public struct JSONLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level
    private let label: String

    public init(label: String, level: Logger.Level) {
        self.label = label
        self.logLevel = level
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        guard var data = line(event, at: Date()) else { return }
        data.append(0x0A)
        FileHandle.standardError.write(data)
    }

    /// The JSON object of one line.
    func line(_ event: LogEvent, at date: Date) -> Data? {
        var object: [String: Any] = [
            // UTC with its `Z`, to the millisecond.
            "time": date.formatted(Self.time),
            "level": event.level.rawValue,
            "logger": label,
            "message": event.message.description,
        ]
        let merged = metadata.merging(event.metadata ?? [:], uniquingKeysWith: { $1 })
        for (key, value) in merged {
            // Hummingbird's own request id beside Herald's (the X-Request-Id) says nothing more.
            if key == "hb.request.id", merged["request_id"] != nil { continue }
            let text = "\(value)"
            // A number only when it is one JSON can hold (not "inf" or "nan", which would lose the line).
            let number: Any? = Int(text) ?? Double(text).flatMap { $0.isFinite ? $0 : nil }
            object[key] = Self.isNumeric(key) ? (number ?? text) : text
        }
        return try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
    }

    private static let time = Date.ISO8601FormatStyle(includingFractionalSeconds: true)

    /// Fields written as JSON numbers (metadata values are text): a status, a process id, a
    /// count, and durations (`_ms`, `_seconds`), so that log tooling can compare them.
    static func isNumeric(_ key: String) -> Bool {
        ["status", "backend_pid", "pid", "port", "attempt", "attempts", "count"].contains(key) || key.hasSuffix("_ms")
            || key.hasSuffix("_seconds") || key.hasSuffix("_count")
    }
}
