import Foundation
import Mustache
import Synchronization

/// A message template for one channel and locale, in Mustache. `subject` is the in-app title
/// or the email subject; `body` the text; `html` the email's HTML part.
public struct TemplateContent: Sendable, Equatable, Codable {
    public var subject: String
    public var body: String
    public var html: String?

    public init(subject: String, body: String, html: String? = nil) {
        self.subject = subject
        self.body = body
        self.html = html
    }
}

/// Mustache templates: validated when saved, rendered with the event payload, the recipient
/// and the organisation. Values are HTML-escaped unless a template uses `{{{triple}}}`.
public enum TemplateRenderer {
    /// How many sections a template may hold (`{{#a}}`, `{{^a}}`, and the inheritance tags
    /// `{{$a}}` and `{{<a}}`), and how many transforms one tag may nest (`{{a(b(c))}}`). The parser
    /// reads each nested section, and each nested transform, by recursion: a trial's template of
    /// 700 nested sections overflowed the stack and crashed the server for every organisation.
    /// Templates people write hold a few of each.
    public static let maximumSections = 100
    public static let maximumNestedTransforms = 8

    /// Parses `source`; a broken template is a validation error that names the line.
    public static func validate(_ source: String, field: String) throws(ValidationError) {
        do {
            if let (offset, problem) = beyondParser(source) {
                throw ValidationError(field: field, message: "\(position(of: offset, in: source)): \(problem).")
            }
            _ = try MustacheTemplate(string: source)
            if let (offset, problem) = unsupportedTag(in: source) {
                let before = source[..<source.index(source.startIndex, offsetBy: offset)]
                let line = before.split(separator: "\n", omittingEmptySubsequences: false)
                let text = source.split(separator: "\n", omittingEmptySubsequences: false)[line.count - 1]
                throw ValidationError(
                    field: field,
                    message:
                        "line \(line.count), column \((line.last?.count ?? 0) + 1): \(problem) near \"\(text.trimmingCharacters(in: .whitespaces))\"."
                )
            }
        } catch let error as ValidationError {
            throw error
        } catch let error as MustacheTemplate.ParserError {
            throw ValidationError(
                field: field,
                message:
                    "line \(error.context.lineNumber), column \(error.context.columnNumber): \(problem(error.error)) near \"\(error.context.line.trimmingCharacters(in: .whitespaces))\"."
            )
        } catch {
            throw ValidationError(field: field, message: "is not a valid Mustache template: \(error).")
        }
    }

    /// "line L, column C" of the UTF-8 offset `offset` in `source`.
    static func position(of offset: Int, in source: String) -> String {
        let index = source.utf8.index(source.utf8.startIndex, offsetBy: min(offset, source.utf8.count))
        let lines = source[..<index].split(separator: "\n", omittingEmptySubsequences: false)
        return "line \(lines.count), column \((lines.last?.count ?? 0) + 1)"
    }

    /// Why `source` must not reach the parser (the UTF-8 offset of the tag, and why), or nil.
    /// Counted on bytes before anything is parsed, and never fewer than the parser would find:
    /// the parser's tags are `{{` followed at once by the tag's character, and a `{{` it sees is
    /// always these two bytes (a `{` joined to a mark is another character to it, one more here).
    /// Sections are counted, not their depth: a `{{/a}}` the parser would read as text cannot
    /// lower the count. Delimiter changes (`{{=<% %>=}}`) are refused, so no tag hides behind
    /// delimiters these bytes do not know.
    static func beyondParser(_ source: String) -> (offset: Int, problem: String)? {
        let bytes = Array(source.utf8)
        let nameBytes = Set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-_?()*".utf8)
        var sections = 0
        var index = 0
        while index + 2 < bytes.count {
            guard bytes[index] == UInt8(ascii: "{"), bytes[index + 1] == UInt8(ascii: "{") else {
                index += 1
                continue
            }
            let start = index
            var at = index + 2
            switch bytes[at] {
            case UInt8(ascii: "="):
                return (start, "changing the delimiters ({{= =}}) is not supported; write the tags with {{ and }}")
            case UInt8(ascii: "#"), UInt8(ascii: "^"), UInt8(ascii: "$"), UInt8(ascii: "<"):
                sections += 1
                if sections > maximumSections {
                    return (start, "more than \(maximumSections) sections ({{#…}}, {{^…}}); use fewer")
                }
                at += 1
            case UInt8(ascii: "{"), UInt8(ascii: "&"), UInt8(ascii: "/"):
                at += 1
            default:
                break
            }
            // The tag's name as the parser reads it: spaces (and, to be safe, any byte of a
            // character that is not ASCII), then name characters; each "(" nests a transform.
            while at < bytes.count, bytes[at] == 0x20 || (0x09...0x0D).contains(bytes[at]) || bytes[at] >= 0x80 { at += 1 }
            var brackets = 0
            while at < bytes.count, nameBytes.contains(bytes[at]) {
                if bytes[at] == UInt8(ascii: "(") { brackets += 1 }
                at += 1
            }
            if brackets > maximumNestedTransforms {
                return (start, "more than \(maximumNestedTransforms) transforms in one tag ({{a(b(c))}}); use fewer")
            }
            index = start + 2
        }
        return nil
    }

    /// What the parser lets through and renders as nothing, found in `source` (the character
    /// offset of the tag, and why): a `{{` never closed at the end of the text, a partial (Herald
    /// has no way to define one) and a tag with no name. A trial saved each, and its text lost
    /// them silently. Nil when there is none, or when the template changes its delimiters.
    static func unsupportedTag(in source: String) -> (offset: Int, problem: String)? {
        guard !source.contains("{{=") else { return nil }
        let characters = Array(source)
        var index = 0
        while index + 1 < characters.count {
            guard characters[index] == "{", characters[index + 1] == "{" else {
                index += 1
                continue
            }
            var close = index + 2
            while close + 1 < characters.count, !(characters[close] == "}" && characters[close + 1] == "}") { close += 1 }
            guard close + 1 < characters.count else { return (index, "a tag opened with {{ is never closed with }}") }
            let inside = String(characters[(index + 2)..<close]).trimmingCharacters(in: .whitespaces)
            let name = inside.hasPrefix("{") ? String(inside.dropFirst()).trimmingCharacters(in: .whitespaces) : inside
            if name.isEmpty { return (index, "a tag has no name ({{}})") }
            if name.hasPrefix(">") { return (index, "partials ({{>name}}) are not supported: Herald has no way to define one") }
            index = close + 2
        }
        return nil
    }

    /// The parser's error in words (its names are the library's: `overflow` is the end of the
    /// text reached inside a tag).
    static func problem(_ error: any Error) -> String {
        if let known = error as? MustacheTemplate.Error {
            switch known {
            case .unfinishedName: return "a tag's name is not finished"
            case .expectedSectionEnd: return "a section is opened and never closed ({{#name}} or {{^name}} needs its {{/name}})"
            case .sectionCloseNameIncorrect: return "a section is closed with another name than it was opened with ({{#a}} … {{/a}})"
            case .invalidSetDelimiter: return "the delimiters set with {{= =}} are not valid"
            case .invalidConfigVariableSyntax, .unrecognisedConfigVariable:
                return "a {{% … }} pragma is not one Mustache knows (CONTENT_TYPE: TEXT is)"
            default: return "the template cannot be read (\(known))"
            }
        }
        // The scanner's own error (internal to the library) when the text ends inside a tag.
        if String(describing: error) == "overflow" { return "a tag opened with {{ is never closed with }}" }
        return "the template cannot be read (\(error))"
    }

    /// Renders a template that passed `validate`; an unparsable one renders as its source.
    public static func render(_ source: String, _ context: [String: Any]) -> String {
        parsed(source, pragma: HTMLEscaping.pragma)?.render(context) ?? source
    }

    /// `source` parsed after `pragma`, or nil when it does not parse or is beyond what the
    /// parser's recursion may be given (`beyondParser`): saved templates passed `validate`, and
    /// the limits are checked again so that no stored text reaches the parser unchecked.
    static func parsed(_ source: String, pragma: String) -> MustacheTemplate? {
        beyondParser(source) == nil ? try? MustacheTemplate(string: pragma + source) : nil
    }

    /// Renders every part of `content` (parsed once per process: `ParsedTemplate.cached`);
    /// `escaping` as in `ParsedTemplate`.
    public static func render(_ content: TemplateContent, _ context: [String: Any], escaping: ValueEscaping = .html) -> TemplateContent {
        ParsedTemplate.cached(content, escaping: escaping).render(context)
    }
}

/// How a template's `{{values}}` are escaped for where its text goes (`{{{x}}}` and `{{& x}}`
/// never are). The email's HTML part is always `html`.
public enum ValueEscaping: Sendable, Hashable {
    /// HTML's five characters: the in-app text, webhook bodies, Slack (whose own escapes are
    /// `&amp;`, `&lt;` and `&gt;`, so a value makes no link or mention there).
    case html
    /// Nothing: an email's Subject header and text/plain part, which no client reads as HTML.
    case text
    /// HTML's, then Mattermost's Markdown: a value could make a link, an image that loads when
    /// the message is shown, a heading or a channel-wide mention (a trial). Markdown's
    /// punctuation is escaped with a backslash, and a word joiner after `@` keeps `@channel`,
    /// `@all` and `@here` from notifying everyone while they read as written.
    case mattermost

    /// How `channel`'s subject and text escape values: an email's are text, a Mattermost chat's
    /// Markdown, every other HTML (`format`: the endpoint's, for chat).
    public static func of(_ channel: NotificationChannel, format: EndpointFormat? = nil) -> ValueEscaping {
        switch channel {
        case .email: .text
        case .chat where format == .mattermost: .mattermost
        default: .html
        }
    }

    /// `text` escaped this way.
    public func escape(_ text: String) -> String {
        switch self {
        case .text: text
        case .html: htmlEscaped(text)
        // Markdown's escapes first: HTML's entities (`&#39;`) hold a `#` that must stay bare.
        case .mattermost: htmlEscaped(markdownEscaped(text))
        }
    }

    /// The Mustache pragma that makes `{{x}}` escape this way.
    var pragma: String {
        switch self {
        case .text: "{{% CONTENT_TYPE: TEXT}}"
        case .html: HTMLEscaping.pragma
        case .mattermost: HTMLEscaping.mattermostPragma
        }
    }
}

/// CommonMark's backslash escapes for the punctuation that makes links and images (`[`, `]`),
/// emphasis, code, ATX headings and tables, and a word joiner (U+2060) after an `@` that starts a
/// word (a mention; `ana@club.example` keeps its bytes). `&`, `<` and `>` become HTML entities
/// after this (no HTML, autolink or quote). A web address (`http://`, `https://` or `www.` and a
/// letter or digit, up to the next space, with no `[` or `]` in it) keeps its punctuation:
/// Mattermost links it by itself from the raw text, so a backslash would end up in the link (a
/// tracked link's token holds `_`: a review). Its `@`s are treated as anywhere else.
func markdownEscaped(_ text: String) -> String {
    let special: Set<Unicode.Scalar> = ["\\", "`", "*", "_", "[", "]", "#", "~", "|"]
    guard text.unicodeScalars.contains(where: { special.contains($0) || $0 == "@" }) else { return text }
    var out = String.UnicodeScalarView()
    let scalars = Array(text.unicodeScalars)
    var addressEnd = 0
    for (index, scalar) in scalars.enumerated() {
        let startsWord = index == 0 || !isWordScalar(scalars[index - 1])
        if index >= addressEnd && startsWord { addressEnd = webAddressEnd(scalars, from: index) ?? index }
        if index >= addressEnd && special.contains(scalar) { out.append("\\") }
        out.append(scalar)
        if scalar == "@" && startsWord { out.append("\u{2060}") }
    }
    return String(out)
}

private func isWordScalar(_ scalar: Unicode.Scalar) -> Bool {
    scalar.properties.isAlphabetic || ("0"..."9").contains(scalar)
}

/// Where a web address starting at `start` ends (the next white space); nil when none starts
/// there, or when it holds a `[` or `]` (which could make a Markdown link where the address is not
/// linked by itself).
private func webAddressEnd(_ scalars: [Unicode.Scalar], from start: Int) -> Int? {
    let prefix = ["https://", "http://", "www."].first { prefix in
        let p = Array(prefix.unicodeScalars)
        return start + p.count < scalars.count
            && zip(scalars[start..<start + p.count], p).allSatisfy { $0.properties.lowercaseMapping == String($1) }
            && isWordScalar(scalars[start + p.count])
    }
    guard prefix != nil else { return nil }
    var end = start
    while end < scalars.count && !scalars[end].properties.isWhitespace {
        if scalars[end] == "[" || scalars[end] == "]" { return nil }
        end += 1
    }
    return end
}

/// Herald's escapings as Mustache content types, each registered the first time a template asks
/// for its pragma. HTML is escaped code point by code point (`htmlEscaped`): Mustache's own
/// compares whole characters, so `"` with a combining mark after it went out as a raw quote.
/// Every template Herald renders as HTML starts with `HTMLEscaping.pragma`.
struct HTMLEscaping: MustacheContentType {
    let escaping: ValueEscaping

    func escapeText(_ text: String) -> String { escaping.escape(text) }

    static let pragma = register(.html, named: "HERALD_HTML")
    /// `ValueEscaping.mattermost`.
    static let mattermostPragma = register(.mattermost, named: "HERALD_MATTERMOST")

    private static func register(_ escaping: ValueEscaping, named name: String) -> String {
        MustacheContentTypes.register(HTMLEscaping(escaping: escaping), named: name)
        return "{{% CONTENT_TYPE: \(name)}}"
    }
}

/// A template parsed once, rendered for many recipients.
public struct ParsedTemplate: Sendable {
    let subject: MustacheTemplate?
    let body: MustacheTemplate?
    let html: MustacheTemplate?
    let source: TemplateContent
    /// The same parts when they are only text and variables (`PlainTemplate`), which render
    /// without Mustache's lookups; nil for a part that holds anything else.
    let plainSubject: PlainTemplate?
    let plainBody: PlainTemplate?
    let plainHTML: PlainTemplate?

    /// The subject and the text body escaped by `escaping` (`.text` for an email's Subject header
    /// and text/plain part, which no client reads as HTML); the HTML part always as HTML.
    public init(_ content: TemplateContent, escaping: ValueEscaping = .html) {
        source = content
        subject = TemplateRenderer.parsed(content.subject, pragma: escaping.pragma)
        body = TemplateRenderer.parsed(content.body, pragma: escaping.pragma)
        html = content.html.flatMap { TemplateRenderer.parsed($0, pragma: HTMLEscaping.pragma) }
        plainSubject = subject == nil ? nil : PlainTemplate(content.subject, escaping: escaping)
        plainBody = body == nil ? nil : PlainTemplate(content.body, escaping: escaping)
        plainHTML = html == nil ? nil : content.html.flatMap { PlainTemplate($0, escaping: .html) }
    }

    /// The parsed form of `content`, parsed once per process while it is among the last few
    /// hundred used. The key is the content itself, so an edited template is a new entry and
    /// nothing needs invalidating. (The worker parsed every template of a type for every
    /// message it sent: issue 12.)
    public static func cached(_ content: TemplateContent, escaping: ValueEscaping = .html) -> ParsedTemplate {
        let key = CacheKey(content, escaping: escaping)
        if let known = cache.withLock({ $0[key] }) { return known }
        let parsed = ParsedTemplate(content, escaping: escaping)
        cache.withLock { cache in
            if cache.count >= cacheLimit { cache.removeAll(keepingCapacity: true) }
            cache[key] = parsed
        }
        return parsed
    }

    /// The content's bytes: `String` equality is canonical equivalence, and two templates that
    /// differ only in their Unicode normalisation must each render as written.
    private struct CacheKey: Hashable {
        let subject: [UInt8]
        let body: [UInt8]
        let html: [UInt8]?
        let escaping: ValueEscaping
        init(_ content: TemplateContent, escaping: ValueEscaping) {
            subject = Array(content.subject.utf8)
            body = Array(content.body.utf8)
            html = content.html.map { Array($0.utf8) }
            self.escaping = escaping
        }
    }

    private static let cacheLimit = 512
    private static let cache = Mutex<[CacheKey: ParsedTemplate]>([:])

    /// The content for one recipient (a part that does not parse renders as its source).
    public func render(_ context: [String: Any]) -> TemplateContent {
        render(TemplateScope(shared: context, own: [:]))
    }

    /// `render`, with the context in two parts that are merged only if Mustache renders.
    func render(_ scope: TemplateScope) -> TemplateContent {
        var merged: [String: Any]?
        func context() -> [String: Any] {
            if let merged { return merged }
            let built = scope.merged
            merged = built
            return built
        }
        return TemplateContent(
            subject: plainSubject?.render(scope) ?? subject?.render(context()) ?? source.subject,
            body: plainBody?.render(scope) ?? body?.render(context()) ?? source.body,
            html: source.html.map { plainHTML?.render(scope) ?? html?.render(context()) ?? $0 })
    }
}

/// A rendering context in two parts: what every recipient of an event shares (`payload`,
/// `organisation`, `event`…), built once per plan, and what is the recipient's own (`recipient`,
/// `links`), whose names win. A fan-out copied the shared dictionary into a new one for each of
/// its recipients (issue 12); now only Mustache, for a template that is more than text and
/// variables, gets them merged.
struct TemplateScope {
    var shared: [String: Any]
    var own: [String: Any]

    func value(_ name: String) -> Any? { own[name] ?? shared[name] }

    var merged: [String: Any] { own.isEmpty ? shared : shared.merging(own) { $1 } }
}

/// A template made only of text and variables (`{{a.b}}`, `{{{a.b}}}`, `{{&a.b}}`), rendered by
/// walking the context's dictionaries: Mustache looks each name up through dynamic casts, which
/// was 30 % of a fan-out's planning (issue 12). Anything else in the template (a section, a
/// partial, a comment, a pragma, a delimiter change, a transform) leaves it to Mustache, and so
/// does, at render time, a value other than a string, an integer or a boolean: the two render the
/// same bytes (`PlainTemplateTests` renders both ways).
struct PlainTemplate: Sendable {
    enum Part: Sendable {
        case text(String)
        case value(path: [String], escaped: Bool)
    }
    let parts: [Part]
    /// How an escaped `{{x}}` is escaped.
    let escaping: ValueEscaping

    /// Nil when `source` holds more than text and variables; `{{x}}` escaped by `escaping`
    /// (`.text`: not at all, as under the pragma `CONTENT_TYPE: TEXT`).
    init?(_ source: String, escaping: ValueEscaping) {
        self.escaping = escaping
        var parts: [Part] = []
        var rest = source[...]
        while let open = rest.range(of: "{{") {
            if open.lowerBound > rest.startIndex { parts.append(.text(String(rest[..<open.lowerBound]))) }
            var tag = rest[open.upperBound...]
            var escaped = escaping != .text
            let close: String
            if tag.first == "{" {
                tag = tag.dropFirst()
                escaped = false
                close = "}}}"
            } else {
                close = "}}"
                if tag.first == "&" {
                    tag = tag.dropFirst()
                    escaped = false
                }
            }
            guard let end = tag.range(of: close) else { return nil }
            let name = tag[..<end.lowerBound].trimmingCharacters(in: .whitespaces)
            guard Self.isPlain(name) else { return nil }
            parts.append(.value(path: name.split(separator: ".").map(String.init), escaped: escaped))
            rest = tag[end.upperBound...]
        }
        if !rest.isEmpty { parts.append(.text(String(rest))) }
        self.parts = parts
    }

    /// `a`, `a.b_c`, `a.b-2`: names and dots, no leading, trailing or double dot.
    static func isPlain(_ name: String) -> Bool {
        !name.isEmpty
            && name.split(separator: ".", omittingEmptySubsequences: false).allSatisfy { part in
                !part.isEmpty
                    && part.unicodeScalars.allSatisfy {
                        $0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0) || $0 == "_" || $0 == "-")
                    }
            }
    }

    /// The rendered text; nil when a value is neither a string, an integer nor a boolean (or a
    /// name goes through something that is not a dictionary), for Mustache to render instead.
    func render(_ context: [String: Any]) -> String? {
        render(TemplateScope(shared: context, own: [:]))
    }

    func render(_ scope: TemplateScope) -> String? {
        var out = ""
        for part in parts {
            switch part {
            case .text(let text):
                out += text
            case .value(let path, let escaped):
                var value: Any? = scope.value(path[0])
                for name in path.dropFirst() {
                    guard let object = value else { break }
                    if let dictionary = object as? [String: Any] {
                        value = dictionary[name]
                    } else if let object = object as? TemplateObject {
                        value = object.fields[name]
                    } else {
                        return nil
                    }
                }
                guard let value else { continue } // a name not there renders nothing, as in Mustache
                let text: String
                switch value {
                case let string as String: text = string
                case let number as Int: text = String(number)
                case let flag as Bool: text = flag ? "true" : "false"
                default: return nil
                }
                out += escaped ? escaping.escape(text) : text // as the pragma's content type escapes for Mustache
            }
        }
        return out
    }
}

extension TemplateRenderer {

    /// The template to use for a recipient: their locale and each shorter tag of it (RFC 4647's
    /// lookup: `zh-Hant-TW`, `zh-Hant`, `zh`), the organisation's default likewise, then `en`. (Only
    /// the language was tried after the whole tag, so a `zh-Hant-TW` reader got the `zh` text, not
    /// the `zh-Hant` one: a trial.)
    public static func pick<T>(_ byLocale: [String: T], userLocale: String?, organisationLocale: String) -> (locale: String, value: T)? {
        var order: [String] = []
        for locale in [userLocale, organisationLocale].compactMap({ $0 }) {
            var tag = Substring(locale)
            while !tag.isEmpty {
                order.append(String(tag))
                guard let dash = tag.lastIndex(of: "-") else { break }
                tag = tag[..<dash]
                // A singleton (an extension's or private use's letter) goes with the subtag after it.
                if let dash = tag.lastIndex(of: "-"), tag.distance(from: dash, to: tag.endIndex) == 2 { tag = tag[..<dash] }
            }
        }
        order.append("en")
        for locale in order { if let value = byLocale[locale] { return (locale, value) } }
        return nil
    }
}
