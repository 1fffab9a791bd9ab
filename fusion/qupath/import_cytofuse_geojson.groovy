/**
 * Import CytoFuse detections into QuPath (0.3 or newer).
 *
 * `cytofuse infer` writes one GeoJSON file per image, geojson/<image name without extension>.geojson,
 * holding each cell as a QuPath detection: its outline in level-0 pixels, its class (SCC, AC, SCLC,
 * NSCLC, ...) and measurements (class scores, score, areas; "Area µm^2" when the µm per pixel was known).
 *
 * Use: open the image (or a project), Automate > Show script editor, open this file, set DIR below (or
 * leave it empty to be asked for the folder once) and Run, or Run > Run for project to import every
 * image of a project. From the command line: `QuPath script -p project.qpproj -a /path/to/out/geojson
 * import_cytofuse_geojson.groovy`. Images without a file are reported and left alone; detections
 * imported before from CytoFuse by this script are replaced, not doubled.
 */
import qupath.lib.io.GsonTools
import qupath.lib.objects.PathObject
import com.google.gson.JsonObject
import com.google.gson.JsonParser

String DIR = ''  // e.g. '/data/run1/geojson'; empty: the script argument, else a folder dialog

def folderPath = DIR ?: (binding.hasVariable('args') && args ? args[0] : null)
if (!folderPath) {
    def chosen = Dialogs.promptForDirectory('CytoFuse geojson folder', null)
    if (chosen == null) return
    folderPath = chosen.getAbsolutePath()
}
def folder = new File(folderPath)

def entry = getProjectEntry()
def imageName = entry != null ? entry.getImageName() : getCurrentServer().getMetadata().getName()
def stem = GeneralTools.getNameWithoutExtension(imageName)
def file = new File(folder, stem + '.geojson')
if (!file.isFile()) {
    println "CytoFuse: no ${file.getName()} in ${folder} for image ${imageName}: skipped"
    return
}

def gson = GsonTools.getInstance()
def collection = JsonParser.parseString(file.getText('UTF-8')).getAsJsonObject()
def objects = []
for (feature in collection.getAsJsonArray('features')) {
    objects << gson.fromJson(feature, PathObject)
}
// Replace an earlier import of the same file: those detections carry the CytoFuse measurement "score".
def previous = getDetectionObjects().findAll { it.getMeasurementList().containsKey('score') && it.getPathClass() != null }
removeObjects(previous, true)
addObjects(objects)
println "CytoFuse: ${objects.size()} detections from ${file} added to ${imageName}"
