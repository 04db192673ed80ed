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
    /// Parses `source`; a broken template is a validation error that names the line.
    public static func validate(_ source: String, field: String) throws(ValidationError) {
        do {
            _ = try MustacheTemplate(string: source)
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

    /// The parser's error in words (its names are the library's: `overflow` is the end of the
    /// text reached inside a tag).
    static func problem(_ error: any Error) -> String {
        if let known = error as? MustacheTemplate.Error {
            switch known {
            case .unfinishedName: return "a tag's name is not finished"
            case .expectedSectionEnd: return "a section is opened and never closed ({{#name}} or {{^name}} needs its {{/name}})"
            case .sectionCloseNameIncorrect: return "a section is closed with another name than it was opened with ({{#a}} … {{/a}})"
            case .invalidSetDelimiter: return "the delimiters set with {{= =}} are not valid"
            default: return "the template cannot be read (\(known))"
            }
        }
        // The scanner's own error (internal to the library) when the text ends inside a tag.
        if String(describing: error) == "overflow" { return "a tag opened with {{ is never closed with }}" }
        return "the template cannot be read (\(error))"
    }

    /// Renders a template that passed `validate`; an unparsable one renders as its source.
    public static func render(_ source: String, _ context: [String: Any]) -> String {
        guard let template = try? MustacheTemplate(string: source) else { return source }
        return template.render(context)
    }

    /// Renders every part of `content` (parsed once per process: `ParsedTemplate.cached`);
    /// `plainText` as in `ParsedTemplate`.
    public static func render(_ content: TemplateContent, _ context: [String: Any], plainText: Bool = false) -> TemplateContent {
        ParsedTemplate.cached(content, plainText: plainText).render(context)
    }
}

/// A template parsed once, rendered for many recipients.
public struct ParsedTemplate: Sendable {
    let subject: MustacheTemplate?
    let body: MustacheTemplate?
    let html: MustacheTemplate?
    let source: TemplateContent

    /// `plainText` renders the subject and the text body without HTML escaping (an email's
    /// Subject header and text/plain part, which no client reads as HTML); the HTML part is
    /// always escaped.
    public init(_ content: TemplateContent, plainText: Bool = false) {
        source = content
        let pragma = plainText ? "{{% CONTENT_TYPE: TEXT}}" : ""
        subject = try? MustacheTemplate(string: pragma + content.subject)
        body = try? MustacheTemplate(string: pragma + content.body)
        html = content.html.flatMap { try? MustacheTemplate(string: $0) }
    }

    /// The parsed form of `content`, parsed once per process while it is among the last few
    /// hundred used. The key is the content itself, so an edited template is a new entry and
    /// nothing needs invalidating. (The worker parsed every template of a type for every
    /// message it sent: issue 12.)
    public static func cached(_ content: TemplateContent, plainText: Bool = false) -> ParsedTemplate {
        let key = CacheKey(content, plainText: plainText)
        if let known = cache.withLock({ $0[key] }) { return known }
        let parsed = ParsedTemplate(content, plainText: plainText)
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
        let plainText: Bool
        init(_ content: TemplateContent, plainText: Bool) {
            subject = Array(content.subject.utf8)
            body = Array(content.body.utf8)
            html = content.html.map { Array($0.utf8) }
            self.plainText = plainText
        }
    }

    private static let cacheLimit = 512
    private static let cache = Mutex<[CacheKey: ParsedTemplate]>([:])

    /// The content for one recipient (a part that does not parse renders as its source).
    public func render(_ context: [String: Any]) -> TemplateContent {
        TemplateContent(
            subject: subject?.render(context) ?? source.subject, body: body?.render(context) ?? source.body,
            html: source.html.map { html?.render(context) ?? $0 })
    }
}

extension TemplateRenderer {

    /// The template to use for a recipient: their locale, its language, the organisation's
    /// default, its language, then `en`.
    public static func pick<T>(_ byLocale: [String: T], userLocale: String?, organisationLocale: String) -> (locale: String, value: T)? {
        var order: [String] = []
        for locale in [userLocale, organisationLocale].compactMap({ $0 }) {
            order.append(locale)
            if let language = locale.split(separator: "-").first.map(String.init), language != locale { order.append(language) }
        }
        order.append("en")
        for locale in order { if let value = byLocale[locale] { return (locale, value) } }
        return nil
    }
}
