import Foundation

/// The digest email's template (issue 11): an organisation may set one per locale (Mustache,
/// `PUT /v1/digest-templates/{locale}`); without one, this built-in default renders it. The
/// recipient's locale picks it with the usual fallback (`TemplateRenderer.pick`).
///
/// What a digest template sees:
/// - `recipient.display_name`, `recipient.email`; `organisation.name`;
/// - `cadence` (`daily` or `weekly`), `count` (items), `count_text` (`1 notification`, `3 notifications`);
/// - `sections`: one per category in the order they first appear, each with `category` (its name)
///   and `items`, each with `title`, `body` (may be empty) and `link` (the tracked link, absent
///   when the event names no URL);
/// - `links.unsubscribe`: the one-click unsubscribe link of the digest.
///
/// The subject and the text part are rendered as text (nothing escaped); in the HTML part every
/// value is escaped, `{{{x}}}` included (`escapingEveryValue`). The built-in HTML keeps an item's
/// line breaks (`white-space: pre-line`), as its text part does.
public enum DigestTemplate {
    /// The HTML part with every value escaped: `{{{x}}}` and `{{& x}}` read as `{{x}}`. Items
    /// reached a digest template escaped once, and the docs said to insert them with
    /// `{{{title}}}`; they now arrive as written, so a stored template's triple mustache must
    /// not put a payload's markup into the email.
    public static func escapingEveryValue(_ html: String) -> String {
        html.replacingOccurrences(of: #"\{\{\{\s*([^{}]+?)\s*\}\}\}"#, with: "{{$1}}", options: .regularExpression)
            .replacingOccurrences(of: #"\{\{&\s*([^{}]+?)\s*\}\}"#, with: "{{$1}}", options: .regularExpression)
    }

    public static let builtIn = TemplateContent(
        subject: "{{{organisation.name}}}: your {{cadence}} digest ({{count_text}})",
        body: """
            Hello {{{recipient.display_name}}},

            Here is your {{cadence}} digest of what is new.
            {{#sections}}

            {{{category}}}
            {{#items}}
              - {{{title}}}
            {{#body}}
                {{{body}}}
            {{/body}}
            {{#link}}
                {{{link}}}
            {{/link}}
            {{/items}}
            {{/sections}}

            --
            {{{organisation.name}}}. Stop these emails: {{{links.unsubscribe}}}

            """,
        html: """
            <p>Hello {{recipient.display_name}},</p><p>Here is your {{cadence}} digest of what is new.</p>\
            {{#sections}}<h2>{{category}}</h2><ul>{{#items}}<li><strong>{{#link}}<a href="{{link}}">{{title}}</a>{{/link}}\
            {{^link}}{{title}}{{/link}}</strong>{{#body}}<br><span style="white-space:pre-line">{{body}}</span>{{/body}}</li>{{/items}}</ul>{{/sections}}\
            <hr><p>{{organisation.name}}. <a href="{{links.unsubscribe}}">Stop these emails</a></p>
            """)
}
