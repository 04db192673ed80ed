import Foundation
import Testing

@testable import HeraldCore

/// The built-in digest template (issue 11): what a digest looks like when the organisation set
/// no template of its own.
@Suite("The built-in digest template")
struct DigestTemplateTests {
    let context: [String: Any] = [
        "recipient": ["display_name": "Ana <Bo>", "email": "ana@club.example"],
        "organisation": ["name": "Club & Co"],
        "cadence": "daily", "count": 2, "count_text": "2 notifications",
        "sections": [
            [
                "category": "Outings",
                "items": [
                    ["title": "Hike to the lake", "body": "Annecy, 9:00", "link": "https://h.test/v1/links/a"],
                    ["title": "Dinner"],
                ],
            ]
        ],
        "links": ["unsubscribe": "https://h.test/v1/unsubscribe/u"],
    ]

    @Test("text: one line per item, its body and link indented, the unsubscribe link at the end; nothing escaped")
    func text() {
        let rendered = TemplateRenderer.render(DigestTemplate.builtIn, context, escaping: .text)
        #expect(rendered.subject == "Club & Co: your daily digest (2 notifications)")
        #expect(
            rendered.body == """
                Hello Ana <Bo>,

                Here is your daily digest of what is new.

                Outings
                  - Hike to the lake
                    Annecy, 9:00
                    https://h.test/v1/links/a
                  - Dinner

                --
                Club & Co. Stop these emails: https://h.test/v1/unsubscribe/u

                """, "\(rendered.body)")
    }

    @Test("HTML: every value escaped, triple mustache included (items arrive as written)")
    func tripleMustacheEscaped() throws {
        var template = DigestTemplate.builtIn
        template.html = "{{#sections}}{{#items}}<p>{{{title}}}|{{& body}}|{{{ title }}}</p>{{/items}}{{/sections}}"
        template.html = template.html.map(DigestTemplate.escapingEveryValue)
        var context = self.context
        context["sections"] = [["category": "C", "items": [["title": "<b>x</b>", "body": "a & b"]]]]
        let html = try #require(TemplateRenderer.render(template, context, escaping: .text).html)
        #expect(html == "<p>&lt;b&gt;x&lt;/b&gt;|a &amp; b|&lt;b&gt;x&lt;/b&gt;</p>", "\(html)")
    }

    @Test("HTML: escaped, with a link on a title only when the item has one")
    func html() throws {
        let html = try #require(TemplateRenderer.render(DigestTemplate.builtIn, context, escaping: .text).html)
        #expect(html.contains("<p>Hello Ana &lt;Bo&gt;,</p>") && html.contains("<h2>Outings</h2>"), "\(html)")
        #expect(
            html.contains(
                #"<li><strong><a href="https://h.test/v1/links/a">Hike to the lake</a></strong><br><span style="white-space:pre-line">Annecy, 9:00</span></li>"#
            ), "\(html)"
        )
        #expect(html.contains("<li><strong>Dinner</strong></li>") && html.contains("Club &amp; Co."), "\(html)")
    }
}
