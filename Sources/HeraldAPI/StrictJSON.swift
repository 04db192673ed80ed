import Foundation

/// RFC 8259 JSON, and nothing looser, for request bodies: the decoders behind the generated code
/// take a trailing comma, keep one of two equal keys without a word, and answer a number beyond a
/// 64-bit float's range in their own internals. Each is a 400 here that says where it is: a
/// client's mistake must not be half-read. `problem(in:)` reads the bytes once, without building
/// values; only keys are decoded (to compare them).
enum StrictJSON {
    /// Objects and arrays nested deeper than this are refused (no payload needs it; the decoders'
    /// own limit is deeper and answers in their words).
    static let maxDepth = 100

    /// Why `data` is not a JSON text Herald accepts, in words naming where; nil when it is.
    static func problem(in data: Data) -> String? {
        data.withUnsafeBytes { raw in
            var reader = Reader(bytes: raw.bindMemory(to: UInt8.self))
            // A UTF-8 byte order mark may be ignored (RFC 8259 §8.1); some clients send one.
            if raw.count >= 3, raw[0] == 0xEF, raw[1] == 0xBB, raw[2] == 0xBF { reader.at = 3 }
            do {
                reader.skipSpace()
                try reader.value(depth: 0, path: "")
                reader.skipSpace()
                guard reader.atEnd else { throw Refusal.syntax("more after the end of the JSON text") }
                return nil
            } catch {
                return reader.describe(error)
            }
        }
    }

    enum Refusal: Error {
        case syntax(String)
        case duplicate(key: String, path: String)
        case outOfRange(number: String, path: String)
        case tooDeep
    }

    struct Reader {
        let bytes: UnsafeBufferPointer<UInt8>
        var at = 0

        var atEnd: Bool { at >= bytes.count }
        var current: UInt8? { at < bytes.count ? bytes[at] : nil }

        mutating func skipSpace() {
            while let byte = current, byte == 0x20 || byte == 0x09 || byte == 0x0A || byte == 0x0D { at += 1 }
        }

        mutating func expect(_ byte: UInt8, _ what: String) throws(Refusal) {
            guard current == byte else { throw .syntax("expected \(what)") }
            at += 1
        }

        mutating func literal(_ word: String) throws(Refusal) {
            for byte in word.utf8 {
                guard current == byte else { throw .syntax("expected a value") }
                at += 1
            }
        }

        mutating func value(depth: Int, path: String) throws(Refusal) {
            guard let byte = current else { throw .syntax("the text ends where a value should be") }
            switch byte {
            case UInt8(ascii: "{"): try object(depth: depth + 1, path: path)
            case UInt8(ascii: "["): try array(depth: depth + 1, path: path)
            case UInt8(ascii: "\""): _ = try string(keep: false)
            case UInt8(ascii: "t"): try literal("true")
            case UInt8(ascii: "f"): try literal("false")
            case UInt8(ascii: "n"): try literal("null")
            case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): try number(path: path)
            default: throw .syntax("expected a value")
            }
        }

        mutating func object(depth: Int, path: String) throws(Refusal) {
            guard depth <= StrictJSON.maxDepth else { throw .tooDeep }
            at += 1
            skipSpace()
            if current == UInt8(ascii: "}") {
                at += 1
                return
            }
            var keys = Set<String>()
            while true {
                guard current == UInt8(ascii: "\"") else {
                    throw .syntax(current == UInt8(ascii: "}") ? "a comma before }" : "expected a key in double quotes")
                }
                let key = try string(keep: true) ?? ""
                guard keys.insert(key).inserted else { throw .duplicate(key: key, path: path) }
                skipSpace()
                try expect(UInt8(ascii: ":"), "a colon after a key")
                skipSpace()
                try value(depth: depth, path: path.isEmpty ? key : "\(path).\(key)")
                skipSpace()
                if current == UInt8(ascii: ",") {
                    at += 1
                    skipSpace()
                    continue
                }
                try expect(UInt8(ascii: "}"), "a comma or }")
                return
            }
        }

        mutating func array(depth: Int, path: String) throws(Refusal) {
            guard depth <= StrictJSON.maxDepth else { throw .tooDeep }
            at += 1
            skipSpace()
            if current == UInt8(ascii: "]") {
                at += 1
                return
            }
            var index = 0
            while true {
                if current == UInt8(ascii: "]") { throw .syntax("a comma before ]") }
                try value(depth: depth, path: "\(path)[\(index)]")
                index += 1
                skipSpace()
                if current == UInt8(ascii: ",") {
                    at += 1
                    skipSpace()
                    continue
                }
                try expect(UInt8(ascii: "]"), "a comma or ]")
                return
            }
        }

        /// Reads a string; its text when `keep` (escapes decoded), else nil.
        mutating func string(keep: Bool) throws(Refusal) -> String? {
            at += 1
            var scalars = String.UnicodeScalarView()
            var start = at
            func flush(_ end: Int) {
                guard keep, end > start else { return }
                scalars.append(
                    contentsOf: String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<end]), as: UTF8.self).unicodeScalars)
            }
            while true {
                guard let byte = current else { throw .syntax("a string is not closed") }
                switch byte {
                case UInt8(ascii: "\""):
                    flush(at)
                    at += 1
                    return keep ? String(scalars) : nil
                case UInt8(ascii: "\\"):
                    flush(at)
                    at += 1
                    guard let escaped = current else { throw .syntax("a string is not closed") }
                    at += 1
                    switch escaped {
                    case UInt8(ascii: "\""): scalars.append("\"")
                    case UInt8(ascii: "\\"): scalars.append("\\")
                    case UInt8(ascii: "/"): scalars.append("/")
                    case UInt8(ascii: "b"): scalars.append("\u{8}")
                    case UInt8(ascii: "f"): scalars.append("\u{C}")
                    case UInt8(ascii: "n"): scalars.append("\n")
                    case UInt8(ascii: "r"): scalars.append("\r")
                    case UInt8(ascii: "t"): scalars.append("\t")
                    case UInt8(ascii: "u"):
                        var unit = try hex4()
                        if (0xD800..<0xDC00).contains(unit), current == UInt8(ascii: "\\"), at + 1 < bytes.count,
                            bytes[at + 1] == UInt8(ascii: "u")
                        {
                            let mark = at
                            at += 2
                            let low = try hex4()
                            if (0xDC00..<0xE000).contains(low) {
                                unit = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
                            } else {
                                at = mark
                            }
                        }
                        // Half of a surrogate pair without its other half is no character: the
                        // decoders behind the generated code refuse it in their own words.
                        guard let scalar = Unicode.Scalar(unit) else {
                            throw .syntax(
                                "\\u\(String(unit, radix: 16, uppercase: true)) is half of a UTF-16 surrogate pair without its other half "
                                    + "(text must be valid Unicode)")
                        }
                        scalars.append(scalar)
                    default:
                        throw .syntax("\\\(Character(Unicode.Scalar(escaped))) is not an escape JSON has")
                    }
                    start = at
                case 0x00..<0x20:
                    throw .syntax("a control character in a string (write it as an escape such as \\n)")
                case 0x80...0xFF:
                    // A trial's byte 0xFF was refused in the decoders' words, saying nowhere where.
                    guard let length = utf8Sequence() else { throw .syntax("bytes that are not UTF-8 in a string (JSON text is UTF-8)") }
                    at += length
                default:
                    at += 1
                }
            }
        }

        /// The length of the well-formed UTF-8 sequence at `at` (RFC 3629 §4: no overlong form,
        /// no surrogate, nothing past U+10FFFF), or nil.
        func utf8Sequence() -> Int? {
            func continuation(_ offset: Int, _ range: ClosedRange<UInt8> = 0x80...0xBF) -> Bool {
                at + offset < bytes.count && range.contains(bytes[at + offset])
            }
            switch bytes[at] {
            case 0xC2...0xDF: return continuation(1) ? 2 : nil
            case 0xE0: return continuation(1, 0xA0...0xBF) && continuation(2) ? 3 : nil
            case 0xE1...0xEC, 0xEE...0xEF: return continuation(1) && continuation(2) ? 3 : nil
            case 0xED: return continuation(1, 0x80...0x9F) && continuation(2) ? 3 : nil
            case 0xF0: return continuation(1, 0x90...0xBF) && continuation(2) && continuation(3) ? 4 : nil
            case 0xF1...0xF3: return continuation(1) && continuation(2) && continuation(3) ? 4 : nil
            case 0xF4: return continuation(1, 0x80...0x8F) && continuation(2) && continuation(3) ? 4 : nil
            default: return nil
            }
        }

        mutating func hex4() throws(Refusal) -> UInt32 {
            var unit: UInt32 = 0
            for _ in 0..<4 {
                guard let byte = current, let digit = Self.hexDigit(byte) else { throw .syntax("\\u needs four hex digits") }
                unit = unit << 4 | digit
                at += 1
            }
            return unit
        }

        static func hexDigit(_ byte: UInt8) -> UInt32? {
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): UInt32(byte - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): UInt32(byte - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): UInt32(byte - UInt8(ascii: "A") + 10)
            default: nil
            }
        }

        mutating func number(path: String) throws(Refusal) {
            let start = at
            func digits() -> Int {
                let from = at
                while let byte = current, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) { at += 1 }
                return at - from
            }
            if current == UInt8(ascii: "-") { at += 1 }
            if current == UInt8(ascii: "0") {
                at += 1
                if let byte = current, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) {
                    throw .syntax("a number with a leading zero")
                }
            } else if digits() == 0 {
                throw .syntax("a number without digits")
            }
            if current == UInt8(ascii: ".") {
                at += 1
                guard digits() > 0 else { throw .syntax("a number with no digit after its point") }
            }
            if current == UInt8(ascii: "e") || current == UInt8(ascii: "E") {
                at += 1
                if current == UInt8(ascii: "+") || current == UInt8(ascii: "-") { at += 1 }
                guard digits() > 0 else { throw .syntax("a number with no digit in its exponent") }
            }
            let text = String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<at]), as: UTF8.self)
            guard let number = Double(text), number.isFinite else { throw .outOfRange(number: text, path: path) }
        }

        /// The refusal in words, with the line and column for a syntax error.
        func describe(_ error: any Error) -> String {
            switch error as? Refusal {
            case .duplicate(let key, let path):
                return "\(path.isEmpty ? "body" : path): the key \"\(key)\" appears twice in one object; give each key once."
            case .outOfRange(let number, let path):
                return
                    "\(path.isEmpty ? "body" : path): the number \(number) is beyond the range Herald reads (a 64-bit float, about ±1.8e308)."
            case .tooDeep:
                return "The request body nests objects and arrays deeper than \(StrictJSON.maxDepth) levels."
            case .syntax(let what):
                let before = bytes[..<min(at, bytes.count)]
                let line = before.count(where: { $0 == 0x0A }) + 1
                let column = at - ((before.lastIndex(of: 0x0A)).map { $0 + 1 } ?? 0) + 1
                return "The request body is not valid JSON: \(what) at line \(line), column \(column)."
            case nil:
                return "The request body is not valid JSON."
            }
        }
    }
}
