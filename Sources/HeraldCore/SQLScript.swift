/// Splits a SQL script into statements at top-level semicolons, the way psql does: semicolons
/// inside quotes, quoted identifiers, dollar-quoted bodies and comments do not split.
/// PostgresNIO speaks only the extended protocol, which takes one statement at a time.
public enum SQLScript {
    public static func statements(_ script: String) -> [String] {
        let chars = Array(script.unicodeScalars)
        var statements: [String] = []
        var current = String.UnicodeScalarView()
        var i = 0
        var hasContent = false

        func flush() {
            let text = String(current).trimmingWhitespace()
            if hasContent, !text.isEmpty { statements.append(text) }
            current = String.UnicodeScalarView()
            hasContent = false
        }
        func peek(_ offset: Int) -> Unicode.Scalar? {
            i + offset < chars.count ? chars[i + offset] : nil
        }

        while i < chars.count {
            let c = chars[i]
            if c == "-", peek(1) == "-" {
                // Line comment: skip to end of line.
                while i < chars.count, chars[i] != "\n" { i += 1 }
                continue
            }
            if c == "/", peek(1) == "*" {
                var depth = 0
                repeat {
                    if chars[i] == "/", peek(1) == "*" { depth += 1; i += 2; continue }
                    if chars[i] == "*", peek(1) == "/" { depth -= 1; i += 2; continue }
                    i += 1
                } while i < chars.count && depth > 0
                current.append(" ")
                continue
            }
            if c == "'" || c == "\"" {
                // Quoted literal or identifier; a doubled quote is an escaped quote.
                current.append(c)
                i += 1
                while i < chars.count {
                    current.append(chars[i])
                    if chars[i] == c {
                        if peek(1) == c { i += 1; current.append(chars[i]) } else { break }
                    }
                    i += 1
                }
                i += 1
                hasContent = true
                continue
            }
            if c == "$", let tag = dollarTag(chars, at: i) {
                // Dollar-quoted body: copy through to the same closing tag.
                current.append(contentsOf: tag.unicodeScalars)
                i += tag.unicodeScalars.count
                while i < chars.count {
                    if chars[i] == "$", String(String.UnicodeScalarView(chars[i..<min(chars.count, i + tag.unicodeScalars.count)])) == tag {
                        current.append(contentsOf: tag.unicodeScalars)
                        i += tag.unicodeScalars.count
                        break
                    }
                    current.append(chars[i])
                    i += 1
                }
                hasContent = true
                continue
            }
            if c == ";" {
                flush()
                i += 1
                continue
            }
            current.append(c)
            if !c.properties.isWhitespace { hasContent = true }
            i += 1
        }
        flush()
        return statements
    }

    /// `$tag$` or `$$` starting at `index`, if there is one.
    private static func dollarTag(_ chars: [Unicode.Scalar], at index: Int) -> String? {
        var j = index + 1
        while j < chars.count,
            chars[j] == "_" || chars[j].properties.isAlphabetic || (j > index + 1 && chars[j].properties.numericType != nil)
        {
            j += 1
        }
        guard j < chars.count, chars[j] == "$" else { return nil }
        return String(String.UnicodeScalarView(chars[index...j]))
    }
}

extension String {
    func trimmingWhitespace() -> String {
        let scalars = unicodeScalars
        guard let start = scalars.firstIndex(where: { !$0.properties.isWhitespace }),
            let end = scalars.lastIndex(where: { !$0.properties.isWhitespace })
        else { return "" }
        return String(scalars[start...end])
    }
}
