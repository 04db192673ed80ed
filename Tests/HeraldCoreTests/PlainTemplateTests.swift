import Foundation
import Mustache
import Testing

@testable import HeraldCore

/// A template of text and variables renders without Mustache (`PlainTemplate`): byte for byte
/// what Mustache renders, or nothing (and Mustache renders it).
@Suite("Templates of text and variables render as Mustache renders them")
struct PlainTemplateTests {
    let context: [String: Any] = [
        "payload": [
            "title": "Hike <to> the \"lake\" & 'back'", "isq": 25, "urgent": true, "ratio": 2.5, "none": Optional<String>.none as Any,
            "list": ["a", "b"], "nested": ["deeper": ["name": "Zoë — 東京 🦷"]], "empty": "", "dash-key": "dashed",
            "combining": "&\u{301} and &", "markdown": "[x](https://evil.example) @here `c` a_b # h ~s~ | t \\ *e*",
        ] as [String: Any],
        "recipient": ["display_name": "Ana <Bo>", "email": "ana@club.example", "attributes": [String: Any]()] as [String: Any],
        "organisation": ["name": "Club & Co", "slug": "club"],
        "links": [String: String](),
    ]

    func mustache(_ source: String, escaping: ValueEscaping) throws -> String {
        try MustacheTemplate(string: escaping.pragma + source).render(context)
    }

    @Test("text and variables: the same bytes as Mustache, HTML-escaped, as text or for Mattermost's Markdown")
    func sameBytes() throws {
        let templates = [
            "Hello {{recipient.display_name}}, reading {{payload.isq}}.",
            "{{payload.title}}|{{{payload.title}}}|{{&payload.title}}|{{ payload.title }}|{{{ payload.title }}}",
            "{{payload.urgent}} {{payload.missing}} {{missing.deeper}} {{payload.nested.deeper.name}} [{{payload.empty}}]",
            "{{payload.dash-key}} {{organisation.name}}{{organisation.slug}}", "no tags at all", "", "{{payload.combining}}",
            "a } b }} c {{payload.isq}}}", "line one\nline two {{payload.isq}}\n\n", "{{payload.nested.deeper.missing.more}}",
            "{{payload.markdown}} *{{recipient.email}}*",
        ]
        for source in templates {
            for escape in [ValueEscaping.html, .text, .mattermost] {
                let plain = try #require(PlainTemplate(source, escaping: escape), "\(source)")
                #expect(plain.render(context) == (try mustache(source, escaping: escape)), "\(source) escaping \(escape)")
            }
        }
    }

    @Test("Mattermost: a value's link, image, emphasis, code, heading and table marks are backslash-escaped and @ cannot mention")
    func mattermostEscaping() {
        #expect(
            ValueEscaping.mattermost.escape("[a](u) ![i](u) *b* _c_ `d` # e ~f~ | g \\ @channel <h> & ok-1.")
                == "\\[a\\](u) !\\[i\\](u) \\*b\\* \\_c\\_ \\`d\\` \\# e \\~f\\~ \\| g \\\\ @\u{2060}channel &lt;h&gt; &amp; ok-1.")
        #expect(ValueEscaping.mattermost.escape("plain text, 2026-12-07") == "plain text, 2026-12-07")
        // Quotes read as written (HTML's entities, made after Markdown's escapes, keep a bare #).
        #expect(ValueEscaping.mattermost.escape("O'Neil said \"hi\" #1") == "O&#39;Neil said &quot;hi&quot; \\#1")
        // Web addresses keep their punctuation (Mattermost links them from the raw text); an
        // address is only up to a space, and one with [ or ] is escaped like any text; an email
        // address keeps its @, a mention does not.
        #expect(
            ValueEscaping.mattermost.escape(
                "https://h.example/v1/links/a_b#c www.h.example/*x* ana@club.example (@here) HTTPS://H.example/_")
                == "https://h.example/v1/links/a_b#c www.h.example/*x* ana@club.example (@\u{2060}here) HTTPS://H.example/_")
        #expect(
            ValueEscaping.mattermost.escape("https://h.example/[a](https://evil.example) www._x_")
                == "https://h.example/\\[a\\](https://evil.example) www.\\_x\\_")
        #expect(ValueEscaping.text.escape("<a & b>") == "<a & b>")
        #expect(ValueEscaping.html.escape("<a & b>") == "&lt;a &amp; b&gt;")
    }

    @Test("HTML escaping is code point by code point: a quote or < with a combining mark after it is still escaped")
    func combiningMarks() throws {
        let context: [String: Any] = ["x": "\"\u{301} onmouseover=alert(1) <\u{338}b>"]
        let expected = "&quot;\u{301} onmouseover=alert(1) &lt;\u{338}b&gt;"
        #expect(try #require(PlainTemplate("{{x}}", escaping: .html)).render(context) == expected)
        #expect(try MustacheTemplate(string: HTMLEscaping.pragma + "{{x}}").render(context) == expected)
        #expect(TemplateRenderer.render(TemplateContent(subject: "{{x}}", body: "{{#y}}{{/y}}{{x}}"), context).body == expected)
        #expect(htmlEscaped("a\"\u{301}") == "a&quot;\u{301}")
    }

    @Test("anything else is left to Mustache: sections, comments, partials, pragmas, delimiters, transforms, broken tags")
    func leftToMustache() {
        for source in [
            "{{#payload.urgent}}!{{/payload.urgent}}", "{{^a}}x{{/a}}", "{{! note }}", "{{> part}}", "{{% CONTENT_TYPE: TEXT}}x",
            "{{=<% %>=}}<% a %>", "{{uppercased(payload.title)}}", "{{.}}", "{{payload.title", "{{{payload.title}}", "{{}}",
            "{{ &payload.title}}", "{{a..b}}", "{{.a}}", "{{a b}}",
        ] {
            #expect(PlainTemplate(source, escaping: .html) == nil, "\(source)")
        }
    }

    @Test("payload values as a reader expects them: null renders nothing, whole numbers without .0")
    func payloadValues() {
        let payload = JSONValue.object([
            "f": .null, "b": .number(1_234_567_890_123_456), "e": .number(-0.0), "r": .number(2.5), "n": .number(25),
        ])
        let rendered = TemplateRenderer.render(
            TemplateContent(
                subject: "f=[{{payload.f}}] b={{payload.b}} e={{payload.e}} r={{payload.r}}",
                body: "{{#payload.f}}x{{/payload.f}}n={{payload.n}}"),
            ["payload": payload.plain])
        #expect(rendered.subject == "f=[] b=1234567890123456 e=0 r=2.5", "\(rendered.subject)")
        #expect(rendered.body == "n=25", "\(rendered.body)")
    }

    @Test("an array or object of the payload prints as JSON; sections, paths and transforms work on it as on Mustache's own")
    func arraysAndObjects() {
        let payload = JSONValue.object([
            "tags": .array([.string("a\"<b>"), .number(2), .number(2.5), .null, .bool(true)]),
            "visit": .object(["city": .string("Lyon"), "zip": .string("69001"), "rooms": .array([.number(1), .number(2)])]),
            "empty": .array([]),
        ])
        let rendered = TemplateRenderer.render(
            TemplateContent(
                subject: "{{payload.tags}} {{payload.visit}} {{payload.visit.city}} [{{payload.empty}}]",
                body:
                    "{{#payload.visit.rooms}}<{{.}}>{{/payload.visit.rooms}} {{count(payload.tags)}} {{#payload.visit}}{{zip}}{{/payload.visit}}"
                    + "{{^payload.empty}} none{{/payload.empty}} {{{payload.tags}}}"),
            ["payload": payload.plain])
        #expect(
            rendered.subject
                == #"[&quot;a\&quot;&lt;b&gt;&quot;,2,2.5,null,true] {&quot;city&quot;:&quot;Lyon&quot;,&quot;rooms&quot;:[1,2],&quot;zip&quot;:&quot;69001&quot;} Lyon [[]]"#,
            "\(rendered.subject)")
        #expect(rendered.body == #"<1><2> 5 69001 none ["a\"<b>",2,2.5,null,true]"#, "\(rendered.body)")
        // As text (an email's subject): unescaped.
        let text = TemplateRenderer.render(
            TemplateContent(subject: "{{payload.visit.rooms}}", body: ""), ["payload": payload.plain], escaping: .text)
        #expect(text.subject == "[1,2]")
        // A plain template walks into an object of the payload; an array or object is Mustache's to print.
        #expect(PlainTemplate("{{payload.visit.city}}", escaping: .html)?.render(["payload": payload.plain]) == "Lyon")
        #expect(PlainTemplate("{{payload.visit}}", escaping: .html)?.render(["payload": payload.plain]) == .some(nil))
    }

    @Test("a value that is not a string, an integer or a boolean is left to Mustache")
    func otherValues() throws {
        for source in ["{{payload.ratio}}", "{{payload.list}}", "{{payload.none}}", "{{payload.nested}}", "{{payload.title.more}}"] {
            let plain = try #require(PlainTemplate(source, escaping: .html))
            #expect(plain.render(context) == nil, "\(source)")
        }
        // ParsedTemplate takes Mustache's answer for those, and the plain one for the others.
        let parsed = ParsedTemplate(TemplateContent(subject: "{{payload.ratio}} {{payload.isq}}", body: "{{payload.title}}"))
        let rendered = parsed.render(context)
        #expect(rendered.subject == (try mustache("{{payload.ratio}} {{payload.isq}}", escaping: .html)))
        #expect(rendered.body == (try mustache("{{payload.title}}", escaping: .html)))
    }
}
