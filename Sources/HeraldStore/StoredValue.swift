import Foundation
import HeraldCore
import PostgresNIO

/// A value in the database that Herald cannot read: a word its vocabulary does not have, or
/// JSON of the wrong shape. It fails the one request or task that read it (a logged 500),
/// never the process, and is never replaced by a default that would answer something false.
public struct StoredValueError: Error, Sendable, CustomStringConvertible {
    /// The column (or JSON document) that held the value.
    public var column: String
    /// What was wrong, without the value itself when it may be tenant data.
    public var problem: String
    public var description: String { "\(column): \(problem)" }
}

/// A vocabulary word stored in a text column (`severity`, `channel`, `status`, …). It binds as
/// its raw value (`\(severity)`, arrays as `text[]`) and decodes through its cases: a word
/// Herald does not know fails the decode with the column's name, never the value.
public protocol StoredWord: PostgresNonThrowingEncodable, PostgresDecodable, PostgresArrayEncodable, PostgresArrayDecodable,
    RawRepresentable, Codable
where RawValue == String {}

extension StoredWord {
    public static var psqlType: PostgresDataType { .text }
    public static var psqlFormat: PostgresFormat { .binary }
    public static var psqlArrayType: PostgresDataType { .textArray }

    public func encode<JSONEncoder: PostgresJSONEncoder>(into byteBuffer: inout ByteBuffer, context: PostgresEncodingContext<JSONEncoder>) {
        byteBuffer.writeString(rawValue)
    }

    public init<JSONDecoder: PostgresJSONDecoder>(
        from buffer: inout ByteBuffer, type: PostgresDataType, format: PostgresFormat,
        context: PostgresDecodingContext<JSONDecoder>
    ) throws {
        guard let word = Self(rawValue: try String(from: &buffer, type: type, format: format, context: context)) else {
            throw PostgresDecodingError.Code.failure
        }
        self = word
    }
}

extension Severity: StoredWord {}
extension Priority: StoredWord {}
extension Frequency: StoredWord {}
extension NotificationChannel: StoredWord {}
extension ReasonCode: StoredWord {}
extension Permission: StoredWord {}
extension DeliveryStatus: StoredWord {}
extension EventStatus: StoredWord {}
extension AttemptOutcome: StoredWord {}
extension DigestItemStatus: StoredWord {}
extension FeedItemStatus: StoredWord {}
extension EndpointFormat: StoredWord {}
extension ActorKind: StoredWord {}

/// A Codable value stored in a `jsonb` column. It binds as `jsonb` (`\(counts)`, no `::jsonb`
/// round trip through a String) and decodes from `jsonb`/`json`; JSON of the wrong shape fails
/// the decode with the column's name, never the document.
public protocol StoredDocument: PostgresEncodable, PostgresDecodable, Codable {}

extension StoredDocument {
    public init<JSONDecoder: PostgresJSONDecoder>(
        from buffer: inout ByteBuffer, type: PostgresDataType, format: PostgresFormat,
        context: PostgresDecodingContext<JSONDecoder>
    ) throws {
        if format == .binary, type == .jsonb {
            guard buffer.readInteger(as: UInt8.self) == 1 else { throw PostgresDecodingError.Code.failure }
        } else if type != .jsonb, type != .json {
            throw PostgresDecodingError.Code.typeMismatch
        }
        // `{}`, what most users' attributes are: not worth a JSONDecoder (a tenth of a fan-out's
        // planning went to decoding them, issue 12).
        if buffer.readableBytes == 2, buffer.getInteger(at: buffer.readerIndex, as: UInt16.self) == 0x7B7D,
            let empty = JSONDocument<JSONValue>(.object([:])) as Any as? Self
        {
            self = empty
            return
        }
        do {
            self = try context.jsonDecoder.decode(Self.self, from: buffer)
        } catch {
            throw PostgresDecodingError.Code.failure
        }
    }
}

/// A Codable value of any shape (an array, a `JSONValue`) travelling as `jsonb`; arrays of
/// them bind as `jsonb[]`.
public struct JSONDocument<Value: Codable & Sendable>: StoredDocument, PostgresArrayEncodable, PostgresArrayDecodable, Sendable {
    public var value: Value
    public init(_ value: Value) { self.value = value }
    public init(from decoder: any Decoder) throws { value = try Value(from: decoder) }
    public func encode(to encoder: any Encoder) throws { try value.encode(to: encoder) }
    public static var psqlArrayType: PostgresDataType { .jsonbArray }
}

extension PostgresRow {
    /// Decodes a row read from `table`; a value Herald cannot read becomes a `StoredValueError`
    /// naming `table.column` (a logged 500 for the one request), never carrying the value.
    func decode<each Column: PostgresDecodable>(_ columns: (repeat each Column).Type, table: String) throws -> (repeat each Column) {
        do {
            return try decode(columns)
        } catch let error as PostgresDecodingError {
            throw StoredValueError(error, table: table)
        }
    }
}

extension StoredValueError {
    /// What PostgresNIO could not decode, named `table.column`, without the value.
    init(_ error: PostgresDecodingError, table: String) {
        self.init(column: "\(table).\(error.columnName)", problem: "not a \(error.targetType) (\(error.code))")
    }
}
